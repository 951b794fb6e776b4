"""One LoRA expert per domain (PEFT): continued pretraining or SFT, with replay, checkpoints and exact resume.

Resuming is exact because everything a step depends on is either in the
checkpoint (adapter weights, AdamW moments, schedule, RNG) or a pure function
of (seed, step) (the batch, see data.TrainingStream). A run killed at any point
restarts from its last checkpoint and ends with the same weights as a run that
was never interrupted.

Each expert is one job of an executor (expertkit.executors: here in sequence, or
one Ray task each). A job writes only under its own checkpoint folder, staging the
finished adapter there; the driver adds it to the library, so the library has
one writer however many workers train.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable, Protocol, runtime_checkable

import torch

from expertkit import __version__
from expertkit.base import Base, BaseSpec, perplexity
from expertkit.config import DomainConfig, ProjectConfig, TrainConfig
from expertkit.data import Blocks, TrainingStream, load_corpus, make_blocks
from expertkit.errors import ExpertkitError
from expertkit.executors import Context, Executor, Job, LocalExecutor
from expertkit.fsutil import atomic_dir, sha256_of
from expertkit.library import ADAPTER_WEIGHTS, Entry, Kind, Library
from expertkit.optim import language_model_loss, make_optimizer, train_step
from expertkit.progress import console
from expertkit.proxy_loss import proxy_loss_for
from expertkit.replay import REPLAY_LOSSES, replay_loss

TRAINER_STATE = "trainer.pt"
ADAPTER_STATE = "adapter.safetensors"
FINAL = "final"  # the finished adapter, staged beside the checkpoints until the driver adds it to the library


def lora_config(recipe: TrainConfig):
    from peft import LoraConfig

    return LoraConfig(r=recipe.rank, lora_alpha=recipe.alpha, lora_dropout=recipe.dropout,
                      target_modules=list(recipe.target_modules), use_rslora=recipe.use_rslora,
                      bias="none", task_type="CAUSAL_LM")


def recipe_hash(recipe: TrainConfig, task: str, data_fingerprint: str, extra: dict | None = None) -> str:
    """What a checkpoint must match to be resumed: recipe, task, data, and (`extra`) what else shapes the run."""
    fields = {"recipe": recipe.model_dump(), "task": task, "data": data_fingerprint}
    if extra:  # only then: the hashes of plain experts stay what they were
        fields["extra"] = extra
    payload = json.dumps(fields, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


# ---------------------------------------------------------------- checkpoints


def _latest_checkpoint(folder: Path, expected_hash: str) -> Path | None:
    """The newest complete checkpoint of this exact recipe + data; others are stale and removed."""
    if not folder.is_dir():
        return None
    best = None
    for d in folder.glob("step-*"):
        meta = d / "meta.json"
        if not meta.is_file() or json.loads(meta.read_text()).get("recipe_hash") != expected_hash:
            shutil.rmtree(d, ignore_errors=True)
            continue
        if best is None or int(d.name[5:]) > int(best.name[5:]):
            best = d
    return best


def _save_checkpoint(folder: Path, step: int, peft_model, optimizer, scheduler, rhash: str,
                     loss_state: dict | None = None) -> None:
    from peft import get_peft_model_state_dict
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    with atomic_dir(folder / f"step-{step:08d}", overwrite=True) as tmp:
        weights = {k: v.detach().cpu().contiguous() for k, v in get_peft_model_state_dict(peft_model).items()}
        save_file(weights, str(tmp / ADAPTER_STATE))
        torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                    "rng": torch.get_rng_state(), "step": step, "loss": loss_state or {}}, tmp / TRAINER_STATE)
        (tmp / "meta.json").write_text(json.dumps({"recipe_hash": rhash, "step": step}))
    for old in folder.glob("step-*"):
        if old.name != f"step-{step:08d}":
            shutil.rmtree(old, ignore_errors=True)


def _load_checkpoint(ckpt: Path, peft_model, optimizer, scheduler) -> tuple[int, dict]:
    """Restore the adapter, optimizer, schedule and RNG; (the step reached, the loss's own state)."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    set_peft_model_state_dict(peft_model, load_file(str(ckpt / ADAPTER_STATE)))
    state = torch.load(ckpt / TRAINER_STATE, weights_only=True)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["rng"])
    return int(state["step"]), state.get("loss", {})


# ---------------------------------------------------------------- training


@torch.no_grad()
def mean_loss(model, blocks: Blocks, device, batch_size: int) -> float:
    """Token-weighted mean loss over blocks (labels -100 ignored)."""
    from expertkit.evaluate import shifted_nll

    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(blocks), batch_size):
        b = blocks.take(slice(i, i + batch_size))
        logits = model(input_ids=b.input_ids.to(device), attention_mask=b.attention_mask.to(device)).logits
        t, c = shifted_nll(logits, b.labels)
        total, count = total + t, count + c
    return total / max(count, 1)


def _run_steps(peft_model, stream: TrainingStream, recipe: TrainConfig, name: str, ckpt_dir: Path, rhash: str,
               device, advance, loss_fn: Callable = language_model_loss,
               stateful_loss: StatefulLoss | None = None) -> tuple[list[float], int]:
    """The training loop from the last checkpoint (if any) to recipe.steps; this run's losses and first step.
    `stateful_loss` (the loss `loss_fn` wraps, when it keeps state) is checkpointed and restored with the rest."""
    params = [p for p in peft_model.parameters() if p.requires_grad]
    optimizer, scheduler = make_optimizer(params, recipe.learning_rate, recipe.weight_decay, recipe.schedule,
                                          recipe.warmup_steps, recipe.steps)
    start = 0
    ckpt = _latest_checkpoint(ckpt_dir, rhash)
    if ckpt is not None:
        start, loss_state = _load_checkpoint(ckpt, peft_model, optimizer, scheduler)
        if stateful_loss is not None:
            stateful_loss.load_state_dict(loss_state)
        console.print(f"[yellow]resuming expert '{name}' from step {start}[/yellow]")
    losses = []
    advance(start)
    for step in range(start, recipe.steps):
        losses.append(train_step(peft_model, stream.batch(step), optimizer, scheduler, recipe.max_grad_norm, device,
                                 loss_fn))
        advance(info=f"loss {losses[-1]:.3f}")
        done = step + 1
        if done % recipe.checkpoint_every == 0 and done < recipe.steps:
            _save_checkpoint(ckpt_dir, done, peft_model, optimizer, scheduler, rhash,
                             stateful_loss.state_dict() if stateful_loss is not None else None)
    return losses, start


class LossSpec(Protocol):
    """A training loss other than next-token cross-entropy (porting's compatible loss), built where the job runs."""

    def describe(self) -> dict:
        """What the loss is, for the manifest and the checkpoint hash."""

    def build(self, device) -> Callable:
        """The loss function `(model, batch, device) -> tensor`; one that keeps state across steps is a
        StatefulLoss, so a resumed run continues it where the checkpoint left it."""


@runtime_checkable
class StatefulLoss(Protocol):
    """A loss with state across steps (which labeled questions it reads next): saved in every checkpoint."""

    def state_dict(self) -> dict:
        ...

    def load_state_dict(self, state: dict) -> None:
        ...


@dataclass(frozen=True)
class ExpertJob:
    """One expert to train: its data (packed by the driver) and where its checkpoints live."""

    domain: DomainConfig
    fingerprint: str
    blocks: Blocks
    valid: Blocks | None
    recipe: TrainConfig
    checkpoints: str  # on a filesystem every worker sees; a retried job resumes from here
    start_from: str | None = None  # an adapter dir whose weights training continues from (a ported expert)
    loss: LossSpec | None = None  # None: next-token cross-entropy
    first_batch: int = 0  # stream batches the expert it continues from has read (data.TrainingStream)

    def provenance(self) -> dict:
        """What besides recipe and data this run depends on (empty for a plain expert)."""
        out = {}
        if self.start_from:
            out["continued_from_sha256"] = sha256_of(Path(self.start_from) / ADAPTER_WEIGHTS)
        if self.first_batch:
            out["first_batch"] = self.first_batch
        if self.loss is not None:
            out["loss"] = self.loss.describe()
        return out


@dataclass
class TrainState:
    """What every training job of a run shares: the bare base and the general (replay) blocks."""

    base: Base
    general_blocks: Blocks | None


def train_state(spec: BaseSpec, general_blocks: Blocks | None) -> TrainState:
    return TrainState(spec.load(clean=True), general_blocks)


def train_expert_job(job: ExpertJob, state: TrainState, advance) -> dict:
    """Train (or resume) one expert and stage it in `<checkpoints>/final`; the driver adds it to the library.

    Runs wherever the executor puts it: it writes only under its own checkpoint folder.
    """
    from peft import PeftModel, get_peft_model

    started = time.time()
    base, recipe, domain = state.base, job.recipe, job.domain
    provenance = job.provenance()
    rhash = recipe_hash(recipe, domain.task, job.fingerprint, provenance)
    stream = TrainingStream.with_replay(job.blocks, state.general_blocks, recipe.replay, recipe.batch_size,
                                        recipe.seed, job.first_batch)
    ckpt_dir = Path(job.checkpoints)
    torch.manual_seed(recipe.seed)
    if job.start_from:
        peft_model = PeftModel.from_pretrained(base.model, job.start_from, is_trainable=True)
        scale_update(peft_model, 1 / recipe.strength)  # it was saved at this strength: train its full update on
    else:
        peft_model = get_peft_model(base.model, lora_config(recipe))
    domain_loss = job.loss.build(base.device) if job.loss is not None else language_model_loss
    loss_fn = replay_loss(recipe.replay_loss, domain_loss)
    try:
        losses, start = _run_steps(peft_model, stream, recipe, domain.name, ckpt_dir, rhash, base.device, advance,
                                   loss_fn, domain_loss if isinstance(domain_loss, StatefulLoss) else None)
        metrics = {"train_loss_last": losses[-1] if losses else None}
        scale_update(peft_model, recipe.strength)
        if job.valid is not None:
            metrics["valid_ppl"] = perplexity(mean_loss(peft_model, job.valid, base.device, recipe.batch_size))
        with atomic_dir(ckpt_dir / FINAL, overwrite=True) as tmp:
            peft_model.save_pretrained(tmp)
    finally:
        peft_model.unload()  # take the LoRA layers out so the next expert starts from the clean base
    manifest = {
        "domain": domain.name, "task": domain.task, "data_fingerprint": job.fingerprint, "recipe": recipe.model_dump(),
        "recipe_hash": rhash, "steps": recipe.steps, "train_blocks": len(job.blocks), "metrics": metrics,
        "resumed_from_step": start, "train_seconds": round(time.time() - started, 1), "expertkit_version": __version__,
        **provenance,
    }
    return {"staged": str(ckpt_dir / FINAL), "manifest": manifest}


@torch.no_grad()
def scale_update(peft_model, strength: float) -> None:
    """Scale every LoRA update B·A by `strength` (through B: exact for plain LoRA, the only kind trained here)."""
    if strength != 1.0:
        for name, param in peft_model.named_parameters():
            if ".lora_B." in name:
                param.mul_(strength)


def add_expert(library: Library, name: str, result: dict, overwrite: bool) -> Entry:
    """Driver side: copy a staged expert into the library atomically, then drop its checkpoints."""
    staged = Path(result["staged"])
    entry = library.add_entry(Kind.EXPERT, name, lambda tmp: shutil.copytree(staged, tmp, dirs_exist_ok=True),
                              result["manifest"], overwrite=overwrite)
    shutil.rmtree(library.checkpoint_dir(name), ignore_errors=True)
    return entry


def train_all(config: ProjectConfig, base: Base, only: list[str] | None = None, force: bool = False,
              executor: Executor | None = None) -> list[Entry]:
    """Train every domain's expert that is not yet in the library (all of `only` with --force).

    Each expert is one job of `executor` (default: this process, one after another); as each
    finishes, it is written into the library here, atomically.
    """
    base.require_clean("train")
    library = Library(Path(config.library).resolve())
    if library.exists():
        library.check_base(base.identity(), what=f"library {library.root}")
    unknown = sorted(set(only or []) - {d.name for d in config.domains})
    if unknown:
        raise ExpertkitError(f"--only names unknown domains {unknown}; known: {[d.name for d in config.domains]}")
    domains = [d for d in config.domains if not only or d.name in only]
    silo_only = [d for d in domains if d.source is None]
    for d in silo_only:
        console.print(f"domain '{d.name}' is held in silos only: skipped here (`expertkit train --federated` trains "
                      "it across them)")
    domains = [d for d in domains if d.source is not None]
    todo = [d for d in domains if force or not library.has(Kind.EXPERT, d.name)]
    for d in domains:
        if d not in todo:
            console.print(f"expert '{d.name}' already in the library: skipped (pass --force to retrain)")
    if not todo:
        return []
    recipe = config.training
    REPLAY_LOSSES.get(recipe.replay_loss)  # an unknown name fails here, before anything is trained
    # Read and pack every domain's data before training any: bad data fails fast and writes nothing.
    loss = proxy_loss_for(recipe.proxy_for, base) if recipe.proxy_for else None
    jobs = [Job(f"expert {d.name}", expert_job(d, base.tokenizer, recipe, library, loss), total=recipe.steps)
            for d in todo]
    general_blocks = None
    if recipe.replay > 0:
        general_blocks = make_blocks(base.tokenizer, load_corpus(config.general), "train", recipe.block_size)
    library.create_or_check(base.identity())
    executor = executor or LocalExecutor()
    executor.check_shared({"library": library.root, "base model": Path(base.name)})
    entries: dict[str, Entry] = {}

    def finished(job: Job, result: dict) -> None:
        entries[job.payload.domain.name] = add_expert(library, job.payload.domain.name, result, force)

    executor.map(train_expert_job, jobs, Context(partial(train_state, BaseSpec.of(base), general_blocks)),
                 on_result=finished)
    return [entries[d.name] for d in todo]


def expert_job(domain: DomainConfig, tokenizer, recipe: TrainConfig, library: Library,
               loss: LossSpec | None = None) -> ExpertJob:
    """One domain's job, its data read and packed here, by the driver: bad data fails before any training."""
    corpus = load_corpus(domain)
    valid = None
    if corpus.splits["valid"]:
        valid = make_blocks(tokenizer, corpus, "valid", recipe.block_size, domain.task).take(slice(0, 32))
    return ExpertJob(domain, corpus.fingerprint(), make_blocks(tokenizer, corpus, "train", recipe.block_size,
                                                               domain.task),
                     valid, recipe, str(library.checkpoint_dir(domain.name)), loss=loss)
