"""The server's side: plan the rounds, send the global adapter, aggregate exactly, add DP noise, checkpoint
every round, and write the finished expert into the library.

Where the clients run is a `Transport`: in this process (`LocalTransport`), or through Flower
(`expertkit.federated.flower_app`: its simulation engine, or real SuperNodes). The server never reads a
silo's text; it sees the clients' updates, their example counts and a hash of their data.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch

from expertkit import __version__
from expertkit.base import Base
from expertkit.config import DomainConfig, ProjectConfig, TrainConfig
from expertkit.errors import ExpertkitError
from expertkit.federated import aggregate
from expertkit.federated.client import ClientUpdate, RoundTask
from expertkit.federated.compress import decode, payload_bytes
from expertkit.federated.factors import FACTOR_SCHEDULES, factor_keys
from expertkit.federated.privacy import PrivacyLedger
from expertkit.federated.round_files import RoundFiles
from expertkit.library import Entry, Kind, Library
from expertkit.progress import console, progress_bar
from expertkit.replay import REPLAY_LOSSES


class ClientRefused(ExpertkitError):
    """A client that cannot take part for a reason its user must fix (another base, no text): the run stops."""


class Transport(Protocol):
    """Carries the server's messages to the silos' clients and their answers back."""

    def describe(self, identity: dict, recipe: TrainConfig) -> dict[str, dict]:
        """Each silo's {"examples", "fingerprint"} under the server's recipe; raises ClientRefused for a silo that
        cannot take part."""

    def train(self, task: RoundTask) -> dict[str, ClientUpdate | str]:
        """Each silo's update, or a string saying why it failed this round (a dead or late client)."""


@dataclass(frozen=True)
class Plan:
    silos: list[str]
    rounds: int
    min_clients: int
    local_steps: int

    @classmethod
    def of(cls, config: ProjectConfig, domain: DomainConfig) -> "Plan":
        options, silos = config.federated, [s.name for s in domain.silos]
        if len(silos) < 2:
            raise ExpertkitError(f"domain '{domain.name}' has {len(silos)} silo(s): federated training needs at "
                                 "least 2 (list them under the domain's 'silos')")
        recipe = config.training
        client_blocks_per_round = options.local_steps * (options.batch_size or recipe.batch_size)
        rounds = options.rounds or max(1, round(recipe.steps * recipe.batch_size /
                                                (len(silos) * client_blocks_per_round)))
        min_clients = options.min_clients or max(1, len(silos) - 1)
        if min_clients > len(silos):
            raise ExpertkitError(f"federated.min_clients is {min_clients} but domain '{domain.name}' has "
                                 f"{len(silos)} silos: lower it")
        return cls(silos, rounds, min_clients, options.local_steps)


class FederatedTrainer:
    """One domain's federated expert, from its first round (or its last checkpoint) to the library entry."""

    def __init__(self, config: ProjectConfig, base: Base, domain: str):
        base.require_clean("train a federated expert")  # the server builds the initial and final adapter on it
        self.config, self.base = config, base
        self.domain = config.domain(domain)
        self.plan = Plan.of(config, self.domain)
        self.library = Library(Path(config.library).resolve())
        self.schedule = FACTOR_SCHEDULES.get(config.federated.aggregation)
        REPLAY_LOSSES.get(config.training.replay_loss)  # an unknown name fails before any round, not in the silos
        if config.training.proxy_for:
            raise ExpertkitError("training.proxy_for is not supported by federated training yet (silos would each "
                                 "need the large model); train this expert without it, or centrally")
        options = config.federated.privacy
        self.ledger = PrivacyLedger(options, self.plan.rounds) if options is not None else None
        self.folder = self.library.checkpoint_dir(self.domain.name) / "federated"
        self.checkpoints = RoundFiles(self.folder, "round")
        self.run_hash = ""  # set once the silos have described their data (`_identify`)

    def _identify(self, fingerprint: str) -> None:
        """The run's id: what a checkpoint (and a silo's saved residual) must match to be resumed."""
        shaping = self.config.federated.model_dump(exclude={"round_timeout_s", "min_clients"})
        self.run_hash = _hash({"recipe": self.config.training.model_dump(), "federated": shaping,
                               "silos": self.plan.silos, "task": self.domain.task, "data": fingerprint,
                               "base": {k: self.base.identity().get(k) for k in ("weights_hash", "config_hash")}})

    # ------------------------------------------------------------ the run

    def run(self, transport: Transport, overwrite: bool = False) -> Entry:
        started = time.time()
        name = self.domain.name
        if self.library.has(Kind.EXPERT, name) and not overwrite:
            raise ExpertkitError(f"expert '{name}' is already in the library {self.library.root}; pass --force to "
                                 "train it again")
        described = transport.describe(self.base.identity(), self.config.training)
        weights = {silo: described[silo]["examples"] for silo in self.plan.silos}
        fingerprint = _hash(sorted(d["fingerprint"] for d in described.values()))
        self._identify(fingerprint)
        self.library.create_or_check(self.base.identity())
        state, log = self._resume() or (self._initial_state(), [])
        stopped = None
        with progress_bar(f"federated expert {name} ({len(self.plan.silos)} silos)", self.plan.rounds) as advance:
            advance(len(log))
            for r in range(len(log), self.plan.rounds):
                if self.ledger is not None and not self.ledger.allows(r + 1):
                    stopped = f"target epsilon {self.ledger.options.epsilon:g} reached after {r} rounds"
                    break
                state, entry = self._round(transport, r, state, weights)
                log.append(entry)
                self._save(r + 1, state, log)
                info = f"loss {entry['loss']:.3f}" + (f" ε {entry['epsilon']:.2f}" if "epsilon" in entry else "")
                advance(info=info)
        if stopped:
            console.print(f"[yellow]{name}: {stopped}[/yellow]")
        manifest = self._manifest(log, weights, fingerprint, stopped, time.time() - started)
        entry = self.library.add_entry(Kind.EXPERT, name, lambda tmp: self._write_adapter(state, tmp), manifest,
                                       overwrite=overwrite)
        shutil.rmtree(self.library.checkpoint_dir(name), ignore_errors=True)  # rounds (and local clients' state)
        federated = manifest["federated"]
        privacy = federated["privacy"]
        console.print(f"{name}: {federated['rounds']} rounds over {len(self.plan.silos)} silos, "
                      f"{federated['bytes_per_round_per_client']:,.0f} bytes per round per client"
                      + (f", ε = {privacy['epsilon']:.2f} at δ = {privacy['delta']:g}" if privacy else ""))
        return entry

    def _round(self, transport: Transport, r: int, state: dict, weights: dict) -> tuple[dict, dict]:
        factor = self.schedule(r)
        task = RoundTask(r, self.plan.rounds, factor, state, self.config.training, self.config.federated,
                         self.run_hash)
        answers = transport.train(task)
        ok = {silo: a for silo, a in answers.items() if isinstance(a, ClientUpdate)}
        failed = {silo: a for silo, a in answers.items() if not isinstance(a, ClientUpdate)}
        for silo, why in failed.items():
            console.print(f"[yellow]round {r + 1}: silo '{silo}' dropped ({why})[/yellow]")
        if len(ok) < self.plan.min_clients:
            raise ExpertkitError(f"round {r + 1}: only {len(ok)} of {len(self.plan.silos)} silos answered (min_clients "
                                 f"{self.plan.min_clients}); rounds 1-{r} are saved: run the same command again to "
                                 "resume, or lower federated.min_clients")
        shapes = {k: state[k].shape for k in factor_keys(state, factor)}
        compression = self.config.federated.compression
        bits = compression.bits if compression else 32
        updates = [decode(ok[s].payload, shapes, bits) for s in self.plan.silos if s in ok]
        entry = {"round": r + 1, "factor": factor, "clients": sorted(ok), "failed": sorted(failed),
                 "loss": sum(a.loss for a in ok.values()) / len(ok),
                 "bytes_per_client": sum(payload_bytes(a.payload) for a in ok.values()) / len(ok),
                 "update_norm": sum(aggregate.norm(u) for u in updates) / len(updates)}
        if self.ledger is None:
            mean = aggregate.weighted_mean(updates, [weights[s] for s in self.plan.silos if s in ok])
        else:
            clipped = [aggregate.clip(u, self.ledger.options.clip)[0] for u in updates]
            noise = torch.Generator().manual_seed(self.config.training.seed * 1_000_003 + r)
            mean = aggregate.noisy_mean(clipped, self.ledger.noise_std, len(self.plan.silos), noise)
            entry["epsilon"] = self.ledger.epsilon_after(r + 1)
        new_state = aggregate.add(state, mean)
        if not all(torch.isfinite(t).all() for t in new_state.values()):
            noise = (f"; the DP noise (std {self.ledger.noise_std / len(self.plan.silos):.3g} per entry of the mean "
                     f"update, against client updates of norm {entry['update_norm']:.3g}) swamps the updates: raise "
                     "privacy.epsilon, add silos, or lower privacy.clip") if self.ledger else ""
            raise ExpertkitError(f"round {r + 1}: the adapter became non-finite (inf/nan){noise}; nothing was "
                                 "written to the library")
        return new_state, entry

    # ------------------------------------------------------------ adapter state

    def _initial_state(self) -> dict[str, torch.Tensor]:
        """The adapter every client starts from: PEFT's own initialization (B = 0), seeded by the recipe."""
        from peft import get_peft_model, get_peft_model_state_dict

        from expertkit.train import lora_config

        torch.manual_seed(self.config.training.seed)
        peft_model = get_peft_model(self.base.model, lora_config(self.config.training))
        try:
            return {k: v.detach().cpu().clone() for k, v in get_peft_model_state_dict(peft_model).items()}
        finally:
            peft_model.unload()

    def _write_adapter(self, state: dict, folder: Path) -> None:
        from peft import get_peft_model, set_peft_model_state_dict

        from expertkit.train import lora_config, scale_update

        peft_model = get_peft_model(self.base.model, lora_config(self.config.training))
        try:
            set_peft_model_state_dict(peft_model, {k: v.to(self.base.device) for k, v in state.items()})
            scale_update(peft_model, self.config.training.strength)  # the aggregate is the full trained update
            peft_model.save_pretrained(folder)
        finally:
            peft_model.unload()

    # ------------------------------------------------------------ checkpoints

    def _save(self, rounds_done: int, state: dict, log: list) -> None:
        self.checkpoints.save(rounds_done, {"hash": self.run_hash, "state": state, "log": log})

    def _resume(self) -> tuple[dict, list] | None:
        for rounds_done in sorted(self.checkpoints.rounds(), reverse=True):
            try:
                saved = self.checkpoints.load(rounds_done)
            except Exception:  # a torn or foreign file: fall back to the one before
                continue
            if saved.get("hash") == self.run_hash:
                console.print(f"[yellow]federated expert '{self.domain.name}': resuming after round "
                              f"{len(saved['log'])}[/yellow]")
                return saved["state"], saved["log"]
        return None

    # ------------------------------------------------------------ the manifest

    def _manifest(self, log: list, weights: dict, fingerprint: str, stopped: str | None, seconds: float) -> dict:
        options = self.config.federated
        rounds = len(log)
        federated = {
            "silos": self.plan.silos, "examples_per_silo": weights, "rounds": rounds,
            "planned_rounds": self.plan.rounds, "local_steps": options.local_steps, "aggregation": options.aggregation,
            "min_clients": self.plan.min_clients, "dropped_client_rounds": sum(len(e["failed"]) for e in log),
            "bytes_per_round_per_client": (sum(e["bytes_per_client"] for e in log) / rounds) if rounds else 0,
            "compression": options.compression.model_dump() if options.compression else None,
            "privacy": self.ledger.describe(rounds) if self.ledger else None, "stopped": stopped,
        }
        return {
            "domain": self.domain.name, "task": self.domain.task, "data_fingerprint": fingerprint,
            "recipe": self.config.training.model_dump(), "recipe_hash": self.run_hash,
            "steps": rounds * options.local_steps, "train_blocks": sum(weights.values()),
            "metrics": {"train_loss_last": log[-1]["loss"] if log else None}, "train_seconds": round(seconds, 1),
            "expertkit_version": __version__, "federated": federated, "rounds_log": log,
        }


def _hash(value) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:16]

