"""Run every silo's client in this process, one after another: no Ray, no network (tests, one machine)."""

from __future__ import annotations

from pathlib import Path

from expertkit.config import ProjectConfig, TrainConfig
from expertkit.errors import ExpertkitError
from expertkit.federated.client import ClientUpdate, RoundTask, SiloClient
from expertkit.federated.server import ClientRefused


class LocalTransport:
    def __init__(self, config: ProjectConfig, domain: str, state_root: Path, device: str | None = None):
        silos = [s.name for s in config.domain(domain).silos]
        self.clients = {s: SiloClient(config, domain, s, Path(state_root) / s, device) for s in silos}

    def describe(self, identity: dict, recipe: TrainConfig) -> dict[str, dict]:
        out = {}
        for silo, client in self.clients.items():
            try:
                out[silo] = client.describe(identity, recipe)
            except ExpertkitError as e:
                raise ClientRefused(str(e)) from None
        return out

    def train(self, task: RoundTask) -> dict[str, ClientUpdate | str]:
        out: dict[str, ClientUpdate | str] = {}
        for silo, client in self.clients.items():
            try:
                out[silo] = client.train(task)
            except ExpertkitError as e:
                raise ClientRefused(str(e)) from None
            except Exception as e:  # a client that crashes is dropped from this round, as a dead node would be
                out[silo] = f"{type(e).__name__}: {e}"
        return out
