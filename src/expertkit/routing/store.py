"""Routers in the library (`routers/<name>/`): save, load, and route with the calibrated threshold.

    router.json          kind, labels, fitted JSON parameters, the settings it reads prompts with
    router.safetensors   fitted arrays
    expert.json          manifest: experts routed to, threshold, target abstain rate, validation accuracy

A router that names an expert the library no longer holds is refused with one
message saying which and how to fix it; there is no silent fallback.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from expertkit.config import RoutingConfig
from expertkit.errors import ExpertkitError
from expertkit.library import ROUTER_STATE, Entry, Kind, Library
from expertkit.routing.base import Prompts, Router, router_class
from expertkit.routing.calibrate import decide, expert_confidence


@dataclass
class Routing:
    """One routing decision per prompt, with the probabilities behind it."""

    labels: list[str]
    probabilities: torch.Tensor  # [N, L]
    choices: torch.Tensor  # [N] label index
    abstained: torch.Tensor  # [N] True where no expert was confident enough, so the base answers

    @property
    def chosen(self) -> list[str]:
        return [self.labels[i] for i in self.choices.tolist()]


@dataclass
class CalibratedRouter:
    name: str
    router: Router
    threshold: float
    settings: RoutingConfig

    @property
    def experts(self) -> list[str]:
        return self.router.experts

    def route(self, pool, prompts: Prompts) -> Routing:
        probs = self.router.probabilities(pool, prompts, self.settings)
        return Routing(self.router.labels, probs, decide(probs, self.threshold),
                       expert_confidence(probs) < self.threshold)


def save_router(library: Library, calibrated: CalibratedRouter, report: dict, overwrite: bool = False) -> Entry:
    router = calibrated.router
    from safetensors.torch import save_file

    def write(tmp: Path) -> None:
        state = {"kind": router.kind, "labels": router.labels, "params": router.params,
                 "settings": calibrated.settings.model_dump()}
        (tmp / ROUTER_STATE[0]).write_text(json.dumps(state) + "\n", encoding="utf-8")
        save_file({k: v.detach().cpu().contiguous() for k, v in router.tensors.items()}, str(tmp / ROUTER_STATE[1]))

    manifest = {"router_kind": router.kind, "experts": router.experts, "labels": router.labels,
                "threshold": calibrated.threshold, **report}
    return library.add_entry(Kind.ROUTER, calibrated.name, write, manifest, overwrite=overwrite)


def load_router(library: Library, entry: Entry) -> CalibratedRouter:
    """Rebuild a router from its entry; every expert it names must still be in the library."""
    if entry.kind != Kind.ROUTER:
        raise ExpertkitError(f"library entry '{entry.name}' is a {entry.kind}, not a router; pass a router's name")
    missing = [e for e in entry.manifest.get("experts", []) if not library.has_name(e)]
    if missing:
        raise ExpertkitError(f"router '{entry.name}' routes to {missing}, which library {library.root} does not hold; "
                             f"retrain it (`expertkit router train CONFIG --name {entry.name} --force`) "
                             "or restore those experts")
    from safetensors.torch import load_file

    state = json.loads((entry.path / ROUTER_STATE[0]).read_text(encoding="utf-8"))
    tensors = load_file(str(entry.path / ROUTER_STATE[1]))
    router = router_class(state["kind"])(state["labels"], tensors, state["params"])
    return CalibratedRouter(entry.name, router, float(entry.manifest["threshold"]),
                            RoutingConfig.model_validate(state["settings"]))


def find_router(library: Library, name: str | None) -> Entry:
    """The named router, or the library's only router when no name is given."""
    if name is not None:
        return library.get(name)
    routers = library.entries(Kind.ROUTER)
    if len(routers) != 1:
        if not routers:
            raise ExpertkitError(f"library {library.root} has no router; train one with `expertkit router train`")
        raise ExpertkitError(f"library {library.root} has {len(routers)} routers ({[e.name for e in routers]}); "
                             "pass --router NAME")
    return routers[0]
