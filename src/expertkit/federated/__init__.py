"""Federated experts: one domain's expert trained across silos whose text never leaves them (Flower).

`train_federated` is the entry point: it plans the rounds, runs the silos' clients (Flower's simulation, or
in this process) and writes the expert into the library with its rounds, silos and privacy in the manifest.
"""

from __future__ import annotations

from expertkit.base import Base
from expertkit.config import ProjectConfig
from expertkit.errors import ExpertkitError
from expertkit.library import Entry

try:
    from expertkit.federated.server import FederatedTrainer
except ImportError as e:  # opacus (and Flower) come with the `federated` extra
    raise ExpertkitError(f"federated training needs Flower and Opacus ({e.name} is missing): "
                         "pip install 'expertkit[federated]'") from None

ENGINES = ("flower", "local")  # flower: Flower's Simulation Runtime on Ray; local: this process, one silo at a time


def train_federated(config: ProjectConfig, base: Base, domain: str, engine: str = "flower",
                    overwrite: bool = False) -> Entry:
    trainer = FederatedTrainer(config, base, domain)
    state_root = trainer.folder.parent / "clients"
    if engine == "local":
        from expertkit.federated.local import LocalTransport

        return trainer.run(LocalTransport(config, domain, state_root, str(base.device)), overwrite=overwrite)
    from expertkit.federated.flower_app import simulate

    return simulate(trainer, state_root, overwrite)
