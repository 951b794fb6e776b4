"""One LoRA expert per domain (PEFT): continued pretraining or SFT, with replay, checkpoints and exact resume.

Resuming is exact because everything a step depends on is either in the
checkpoint (adapter weights, AdamW moments, schedule, RNG) or a pure function
of (seed, step) (the batch, see data.TrainingStream). A run killed at any point
restarts from its last checkpoint and ends with the same weights as a run that
was never interrupted.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from pathlib import Path

import torch

from expertkit import __version__
from expertkit.base import Base, perplexity
from expertkit.config import DomainConfig, ProjectConfig, TrainConfig
from expertkit.data import Blocks, Corpus, TrainingStream, load_corpus, make_blocks
from expertkit.errors import ExpertkitError
from expertkit.fsutil import atomic_dir
from expertkit.library import Entry, Library
from expertkit.optim import make_optimizer, train_step
from expertkit.progress import console, progress_bar

TRAINER_STATE = "trainer.pt"
ADAPTER_STATE = "adapter.safetensors"


def lora_config(recipe: TrainConfig):
    from peft import LoraConfig

    return LoraConfig(r=recipe.rank, lora_alpha=recipe.alpha, lora_dropout=recipe.dropout,
                      target_modules=list(recipe.target_modules), use_rslora=recipe.use_rslora,
                      bias="none", task_type="CAUSAL_LM")


def recipe_hash(recipe: TrainConfig, task: str, data_fingerprint: str) -> str:
    payload = json.dumps({"recipe": recipe.model_dump(), "task": task, "data": data_fingerprint}, sort_keys=True)
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


def _save_checkpoint(folder: Path, step: int, peft_model, optimizer, scheduler, rhash: str) -> None:
    from peft import get_peft_model_state_dict
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    with atomic_dir(folder / f"step-{step:08d}", overwrite=True) as tmp:
        weights = {k: v.detach().cpu().contiguous() for k, v in get_peft_model_state_dict(peft_model).items()}
        save_file(weights, str(tmp / ADAPTER_STATE))
        torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                    "rng": torch.get_rng_state(), "step": step}, tmp / TRAINER_STATE)
        (tmp / "meta.json").write_text(json.dumps({"recipe_hash": rhash, "step": step}))
    for old in folder.glob("step-*"):
        if old.name != f"step-{step:08d}":
            shutil.rmtree(old, ignore_errors=True)


def _load_checkpoint(ckpt: Path, peft_model, optimizer, scheduler) -> int:
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    set_peft_model_state_dict(peft_model, load_file(str(ckpt / ADAPTER_STATE)))
    state = torch.load(ckpt / TRAINER_STATE, weights_only=True)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["rng"])
    return int(state["step"])


# ---------------------------------------------------------------- training


@torch.no_grad()
def mean_loss(model, blocks: Blocks, device, batch_size: int = 16) -> float:
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
               device) -> list[float]:
    """The training loop from the last checkpoint (if any) to recipe.steps; returns this run's losses."""
    params = [p for p in peft_model.parameters() if p.requires_grad]
    optimizer, scheduler = make_optimizer(params, recipe.learning_rate, recipe.weight_decay, recipe.schedule,
                                          recipe.warmup_steps, recipe.steps)
    start = 0
    ckpt = _latest_checkpoint(ckpt_dir, rhash)
    if ckpt is not None:
        start = _load_checkpoint(ckpt, peft_model, optimizer, scheduler)
        console.print(f"[yellow]resuming expert '{name}' from step {start}[/yellow]")
    losses = []
    with progress_bar(f"expert {name}", recipe.steps) as advance:
        advance(start)
        for step in range(start, recipe.steps):
            losses.append(train_step(peft_model, stream.batch(step), optimizer, scheduler, recipe.max_grad_norm,
                                     device))
            advance(info=f"loss {losses[-1]:.3f}")
            done = step + 1
            if done % recipe.checkpoint_every == 0 and done < recipe.steps:
                _save_checkpoint(ckpt_dir, done, peft_model, optimizer, scheduler, rhash)
    return losses


def train_expert(base: Base, library: Library, domain: DomainConfig, corpus: Corpus, blocks: Blocks,
                 recipe: TrainConfig, general_blocks: Blocks | None, overwrite: bool = False) -> Entry:
    """Train (or resume) one expert on its packed `blocks` and write it into the library atomically."""
    from peft import get_peft_model

    started = time.time()
    fingerprint = corpus.fingerprint()
    rhash = recipe_hash(recipe, domain.task, fingerprint)
    stream = TrainingStream.with_replay(blocks, general_blocks, recipe.replay, recipe.batch_size, recipe.seed)
    torch.manual_seed(recipe.seed)
    peft_model = get_peft_model(base.model, lora_config(recipe))
    try:
        losses = _run_steps(peft_model, stream, recipe, domain.name, library.checkpoint_dir(domain.name), rhash,
                            base.device)
        metrics = {"train_loss_last": losses[-1] if losses else None}
        if corpus.splits["valid"]:
            valid = make_blocks(base.tokenizer, corpus, "valid", recipe.block_size, domain.task).take(slice(0, 32))
            metrics["valid_ppl"] = perplexity(mean_loss(peft_model, valid, base.device))
        manifest = {
            "domain": domain.name, "task": domain.task, "data_fingerprint": fingerprint, "recipe": recipe.model_dump(),
            "recipe_hash": rhash, "steps": recipe.steps, "train_blocks": len(blocks), "metrics": metrics,
            "train_seconds": round(time.time() - started, 1), "expertkit_version": __version__,
        }
        entry = library.add_entry("expert", domain.name, peft_model.save_pretrained, manifest, overwrite=overwrite)
    finally:
        peft_model.unload()  # take the LoRA layers out so the next expert starts from the clean base
    shutil.rmtree(library.checkpoint_dir(domain.name), ignore_errors=True)
    return entry


def train_all(config: ProjectConfig, base: Base, only: list[str] | None = None, force: bool = False) -> list[Entry]:
    """Train every domain's expert that is not yet in the library (all of `only` with --force)."""
    if base.peft_model is not None:
        raise ExpertkitError("this base already has library adapters attached; train on a freshly loaded base")
    library = Library(config.library)
    if library.exists():
        library.check_base(base.identity(), what=f"library {library.root}")
    unknown = sorted(set(only or []) - {d.name for d in config.domains})
    if unknown:
        raise ExpertkitError(f"--only names unknown domains {unknown}; known: {[d.name for d in config.domains]}")
    domains = [d for d in config.domains if not only or d.name in only]
    todo = [d for d in domains if force or not library.has("expert", d.name)]
    for d in domains:
        if d not in todo:
            console.print(f"expert '{d.name}' already in the library: skipped (pass --force to retrain)")
    if not todo:
        return []
    recipe = config.training
    # Read and pack every domain's data before training any: bad data fails fast and writes nothing.
    corpora = {d.name: load_corpus(d) for d in todo}
    blocks = {d.name: make_blocks(base.tokenizer, corpora[d.name], "train", recipe.block_size, d.task) for d in todo}
    general_blocks = None
    if recipe.replay > 0:
        general_blocks = make_blocks(base.tokenizer, load_corpus(config.general), "train", recipe.block_size)
    library.create_or_check(base.identity())
    return [train_expert(base, library, d, corpora[d.name], blocks[d.name], recipe, general_blocks, overwrite=force)
            for d in todo]
