"""A silo's side of federated training: read only this silo's text, train a round from the global adapter,
send back the change of the factor the round trains.

The same class runs in-process (`LocalTransport`), in Flower's simulation, and on a real Flower SuperNode.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from expertkit.base import Base, identity_mismatch, load_base
from expertkit.config import FederatedConfig, ProjectConfig, TrainConfig
from expertkit.data import Blocks, TrainingStream, load_corpus, make_blocks
from expertkit.errors import ExpertkitError
from expertkit.federated.compress import Payload, compress, plain_payload
from expertkit.federated.factors import factor_keys
from expertkit.federated.round_files import RoundFiles
from expertkit.optim import language_model_loss, make_optimizer, train_step
from expertkit.replay import replay_loss

_LOADED: dict[tuple, tuple[Base, object]] = {}  # (base path, device, LoRA shape) -> (base, its PEFT model), per process


@dataclass(frozen=True)
class RoundTask:
    """What the server sends each client for one round."""

    round_index: int
    rounds: int
    factor: str  # "lora_A" or "lora_B": the factor this round trains
    state: dict[str, torch.Tensor]  # the global adapter (PEFT state-dict names)
    recipe: TrainConfig
    federated: FederatedConfig
    run: str = ""  # the run's id: a client's saved state (AdamW moments, compression residual) belongs to one run


@dataclass(frozen=True)
class ClientUpdate:
    silo: str
    payload: Payload
    examples: int  # the silo's training blocks: its weight in the mean
    loss: float  # mean training loss of its local steps


class SiloClient:
    """One silo's trainer. It reads its own text (`domain.silo_domain`) and the general text for replay.

    The recipe (LoRA shape, block size, replay share) is the server's, sent with `describe`, so silos whose own
    YAMLs differ still train one and the same adapter.
    """

    def __init__(self, config: ProjectConfig, domain: str, silo: str, state_dir: Path, device: str | None = None):
        self.config, self.silo, self.state_dir, self.device = config, silo, Path(state_dir), device
        self.domain = config.domain(domain)
        matches = [s for s in self.domain.silos if s.name == silo]
        if not matches:
            raise ExpertkitError(f"domain '{domain}' has no silo '{silo}'; its silos: "
                                 f"{[s.name for s in self.domain.silos]}")
        self.silo_config = matches[0]
        self.recipe = config.training
        self._blocks: tuple[Blocks, Blocks | None, str] | None = None

    # ------------------------------------------------------------ set-up

    def _model(self):
        from peft import get_peft_model

        from expertkit.train import lora_config

        shape = self.recipe.model_dump_json(include={"rank", "alpha", "dropout", "use_rslora", "target_modules"})
        key = (self.config.base.path, self.device, shape)
        if key not in _LOADED:
            base = load_base(self.config.base.path, self.device)
            _LOADED[key] = (base, get_peft_model(base.model, lora_config(self.recipe)))
        return _LOADED[key]

    def _data(self) -> tuple[Blocks, Blocks | None, str]:
        if self._blocks is None:
            base, _ = self._model()
            recipe = self.recipe
            corpus = load_corpus(self.domain.silo_domain(self.silo_config))
            blocks = make_blocks(base.tokenizer, corpus, "train", recipe.block_size, self.domain.task)
            general = None
            if recipe.replay > 0 and self.config.general is not None:
                general = make_blocks(base.tokenizer, load_corpus(self.config.general), "train", recipe.block_size)
            self._blocks = (blocks, general, corpus.fingerprint())
        return self._blocks

    def describe(self, expected_identity: dict, recipe: TrainConfig) -> dict:
        """Check this silo can take part (same base as the server's, text to train on); its weight and hash."""
        if recipe != self.recipe:
            self.recipe, self._blocks = recipe, None
        base, _ = self._model()
        differs = identity_mismatch(base.identity(), expected_identity)
        if differs:
            raise ExpertkitError(f"silo '{self.silo}' runs on another base ({self.config.base.path}: its "
                                 f"{differs[0][:-5]} hash differs from the server's); every silo must train on the "
                                 "base the library is for")
        blocks, _, fingerprint = self._data()
        return {"examples": len(blocks), "fingerprint": fingerprint}

    # ------------------------------------------------------------ one round

    def train(self, task: RoundTask) -> ClientUpdate:
        from peft import get_peft_model_state_dict, set_peft_model_state_dict

        base, peft_model = self._model()
        blocks, general, _ = self._data()
        recipe, options = task.recipe, task.federated
        set_peft_model_state_dict(peft_model, {k: v.to(base.device) for k, v in task.state.items()})
        trained = set(factor_keys([n for n, _ in peft_model.named_parameters()], task.factor))
        for name, p in peft_model.named_parameters():
            p.requires_grad = name in trained
        params = [p for n, p in peft_model.named_parameters() if n in trained]
        total_steps = task.rounds * options.local_steps
        optimizer, scheduler = make_optimizer(params, options.learning_rate or recipe.learning_rate,
                                              recipe.weight_decay, recipe.schedule, recipe.warmup_steps, total_steps)
        moments = RoundFiles(self.state_dir / (task.run or "run"), f"adamw-{task.factor}")
        saved = moments.latest_before(task.round_index)
        if saved is not None:  # this silo's AdamW moments from its last round on this factor
            optimizer.load_state_dict(saved)
        first = task.round_index * options.local_steps
        with warnings.catch_warnings():  # moving the schedule to this round's place before any optimizer step
            warnings.simplefilter("ignore", UserWarning)
            for _ in range(first):
                scheduler.step()
        silo_seed = recipe.seed * 7919 + sum(self.silo.encode())
        stream = TrainingStream.with_replay(blocks, general, recipe.replay, options.batch_size or recipe.batch_size,
                                            silo_seed)
        torch.manual_seed(silo_seed * 100_003 + task.round_index)
        loss_fn = replay_loss(recipe.replay_loss, language_model_loss)
        losses = [train_step(peft_model, stream.batch(first + i), optimizer, scheduler, recipe.max_grad_norm,
                             base.device, loss_fn) for i in range(options.local_steps)]
        moments.save(task.round_index, optimizer.state_dict())
        after = get_peft_model_state_dict(peft_model)
        update = {k: (after[k].detach().cpu() - task.state[k]) for k in factor_keys(task.state, task.factor)}
        return ClientUpdate(self.silo, self._encode(update, task), len(blocks), sum(losses) / len(losses))

    def _encode(self, update: dict[str, torch.Tensor], task: RoundTask) -> Payload:
        """Plain float32, or compressed with what this silo still owes from earlier rounds (kept on its disk)."""
        options = task.federated.compression
        if options is None:
            return plain_payload(update)
        residuals = RoundFiles(self.state_dir / (task.run or "run"), "residual")
        residual = residuals.latest_before(task.round_index) or {}
        payload, left = compress(update, residual, options)
        residuals.save(task.round_index, {**residual, **left})
        return payload
