"""`expertkit base distill`: a small companion for any large model, reading and writing its tokens.

Proxy-tuning and the other collaborations (compose/collaborate.py) combine two models' next-token
distributions, which is exact only when both share one vocabulary, and most large models have no small
sibling. So we make one: a Llama (whatever the teacher's architecture, so every tool loads it) with the
teacher's tokenizer, trained to match the teacher's next-token distribution on general text.

- initialization (INITS): by default a cut of the teacher itself (companion_init.py: its most influential
  layers, most-read residual coordinates and strongest MLP neurons), so distillation starts near the teacher;
  or ("embedding", and for teachers that cannot be cut) random layers under the teacher's input embedding
  reduced to the student's width by truncated SVD;
- loss: KL from the teacher's distribution restricted to its top-k tokens (renormalized) to the
  student's; the teacher runs once per batch, without gradients;
- resume: a checkpoint (weights, AdamW, schedule, step) every `checkpoint_every` steps beside OUT;
  batches depend only on the step (data.TrainingStream), so a resumed run ends where an uninterrupted
  one does;
- the result is a standard HF dir plus `distill.json` (the teacher's identity, the recipe, the
  perplexity of teacher and companion on the text's test split), which collaborations read to refuse
  a companion distilled from another model.
"""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import time
from pathlib import Path

import torch

from expertkit.base import DISTILL_FILE, Base, count_parameters, load_base, perplexity, pick_device
from expertkit.companion_init import calibrate, cut_config, cut_from_teacher, teacher_init_unsupported
from expertkit.config import DistillConfig, DomainConfig, SourceConfig
from expertkit.data import Blocks, TrainingStream, load_corpus, make_blocks
from expertkit.errors import ExpertkitError
from expertkit.evaluate import scored_blocks
from expertkit.fsutil import atomic_dir, atomic_write_bytes, ensure_writable_dir
from expertkit.optim import make_optimizer, train_step
from expertkit.progress import console, progress_bar
from expertkit.train import mean_loss


def student_config(teacher: Base, config: DistillConfig):
    """init 'embedding': a Llama as wide as `config` asks, with the teacher's vocabulary rows, special ids, context."""
    from transformers import LlamaConfig

    tok, tc = teacher.tokenizer, teacher.model.config
    context = getattr(tc, "max_position_embeddings", None) or 2048
    return LlamaConfig(
        vocab_size=int(teacher.model.get_input_embeddings().weight.shape[0]), hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size, num_hidden_layers=config.num_layers,
        num_attention_heads=config.attention_heads, num_key_value_heads=config.attention_heads,
        max_position_embeddings=context, tie_word_embeddings=True,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)


@torch.no_grad()
def svd_embedding(weight: torch.Tensor, width: int, generator: torch.Generator) -> torch.Tensor:
    """The [V, width] embedding closest to `weight`'s token geometry: U_k S_k of its truncated SVD.

    With tied embeddings the teacher's logits are h · E^T ≈ (h V_k) · (U_k S_k)^T, so a student whose final
    hidden state learns h V_k reproduces them. Columns past the teacher's width start small and random.
    """
    u, s, _ = torch.linalg.svd(weight.float(), full_matrices=False)
    k = min(width, s.numel())
    out = torch.randn(weight.shape[0], width, generator=generator) * 0.02
    out[:, :k] = u[:, :k] * s[:k]
    return out


def embedding_init(run: "DistillRun"):
    """Random layers under the teacher's embedding reduced by SVD."""
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM(student_config(run.teacher, run.config))
    generator = torch.Generator().manual_seed(run.config.seed)
    teacher_embedding = run.teacher.model.get_input_embeddings().weight
    model.get_input_embeddings().weight.data.copy_(svd_embedding(teacher_embedding, run.config.hidden_size, generator))
    return model


def teacher_init(run: "DistillRun"):
    """A cut of the teacher (companion_init.py), or embedding_init where the teacher cannot be cut (said once)."""
    from transformers import LlamaForCausalLM

    teacher, cfg = run.teacher, run.config
    why_not = teacher_init_unsupported(teacher.model)
    if why_not is not None:
        if not run.said_fallback:
            console.print(f"the companion starts from the teacher's embedding only (init 'embedding'): the teacher "
                          f"cannot be cut, {why_not}")
            run.said_fallback = True
        return embedding_init(run)
    _check_fits_in(teacher.model.config, cfg)
    model = LlamaForCausalLM(cut_config(teacher.model, cfg.num_layers, cfg.hidden_size, cfg.intermediate_size,
                                        teacher.tokenizer))
    blocks = run.calibration_blocks()
    calibration = calibrate(teacher.model, blocks.input_ids, blocks.attention_mask, cfg.batch_size)
    run.init_report = cut_from_teacher(model, teacher.model, calibration)
    return model


def _check_fits_in(teacher_config, cfg: DistillConfig) -> None:
    """A cut keeps part of the teacher: each size at most the teacher's."""
    sizes = (("--layers", cfg.num_layers, teacher_config.num_hidden_layers),
             ("--hidden", cfg.hidden_size, teacher_config.hidden_size),
             ("--intermediate", cfg.intermediate_size, teacher_config.intermediate_size))
    too_big = [f"{flag} {mine} > the teacher's {theirs}" for flag, mine, theirs in sizes if mine > theirs]
    if too_big:
        raise ExpertkitError("a companion cut out of the teacher is at most the teacher's size: "
                             + ", ".join(too_big) + " (make it smaller, or pass --init embedding)")
    heads = teacher_config.num_attention_heads
    if cfg.hidden_size % heads:
        below = cfg.hidden_size // heads * heads
        raise ExpertkitError(f"--hidden {cfg.hidden_size} is not a multiple of the teacher's {heads} attention heads, "
                             f"which the companion keeps (transformers' Llama requires it): try {below or heads} "
                             f"or {below + heads}")


INITS = {"teacher": teacher_init, "embedding": embedding_init}  # DistillConfig.init


def topk_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor, k: int) -> torch.Tensor:
    """Mean over real positions of KL(teacher's top-k, renormalized || student)."""
    top, index = teacher_logits.float().topk(min(k, teacher_logits.shape[-1]), dim=-1)
    target = torch.log_softmax(top, dim=-1)
    student = torch.log_softmax(student_logits.float(), dim=-1).gather(-1, index)
    per_position = (target.exp() * (target - student)).sum(-1)
    weight = mask.float()
    return (per_position * weight).sum() / weight.sum().clamp(min=1)


class DistillRun:
    """One distillation: the teacher, the text, the student, and its checkpoint folder beside `out`."""

    def __init__(self, teacher: Base, text: Path, out: Path, config: DistillConfig):
        self.teacher, self.out, self.config = teacher, out, config
        corpus = load_corpus(DomainConfig(name="general", source=SourceConfig(path=str(text))))
        tok = teacher.tokenizer
        self.train = make_blocks(tok, corpus, "train", config.block_size)
        test = make_blocks(tok, corpus, "test", config.block_size)
        # blocks from all over the split, as the scorecard takes them: a folder's files come one after another
        self.test = test.take(scored_blocks(len(test), config.eval_blocks, "spread"))
        self.text = str(text)
        self.init_report: dict = {}  # what a cut of the teacher kept (init 'teacher')
        self.said_fallback = False
        self.checkpoints = out.parent / f"{out.name}.checkpoints"
        recipe = {"config": config.model_dump(), "teacher": teacher.identity(), "text": self.text,
                  "train_blocks": len(self.train)}
        self.fingerprint = hashlib.sha256(json.dumps(recipe, sort_keys=True, default=str).encode()).hexdigest()[:16]

    def student(self):
        """The untrained companion, built the way config.init says, on the teacher's device."""
        torch.manual_seed(self.config.seed)
        return INITS[self.config.init](self).to(self.teacher.device)

    def calibration_blocks(self) -> Blocks:
        """Training blocks spread over the split: what the teacher reads to decide what a cut keeps."""
        return self.train.take(scored_blocks(len(self.train), self.config.calibration_blocks, "spread"))

    def loss(self, student, batch: Blocks, device) -> torch.Tensor:
        ids, mask = batch.input_ids.to(device), batch.attention_mask.to(device)
        with torch.no_grad():
            teacher_logits = self.teacher.model(input_ids=ids, attention_mask=mask).logits
        student_logits = student(input_ids=ids, attention_mask=mask).logits
        # every real position's next-token distribution is a target (a BOS position's too: it predicts the text)
        return topk_kl(student_logits, teacher_logits, mask.bool(), self.config.top_k)

    # -- checkpoints --------------------------------------------------------------------------------

    def resume(self, student, optimizer, scheduler) -> int:
        """The step a checkpoint of this exact run reached (0: none; a checkpoint of other settings is dropped)."""
        path = self.checkpoints / "state.pt"
        if not path.is_file():
            return 0
        state = torch.load(path, map_location=self.teacher.device, weights_only=False)
        if state.get("fingerprint") != self.fingerprint:
            console.print(f"dropping the checkpoint in {self.checkpoints}: it is of another teacher, text or recipe")
            shutil.rmtree(self.checkpoints, ignore_errors=True)
            return 0
        student.load_state_dict(state["student"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        console.print(f"resuming the distillation at step {state['step']} from {path}")
        return int(state["step"])

    def save_checkpoint(self, step: int, student, optimizer, scheduler) -> None:
        self.checkpoints.mkdir(parents=True, exist_ok=True)
        buffer = io.BytesIO()
        torch.save({"fingerprint": self.fingerprint, "step": step, "student": student.state_dict(),
                    "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}, buffer)
        atomic_write_bytes(self.checkpoints / "state.pt", buffer.getvalue())

    # -- the run ------------------------------------------------------------------------------------

    def run(self) -> dict:
        cfg, device = self.config, self.teacher.device
        student = self.student()
        optimizer, scheduler = make_optimizer(student.parameters(), cfg.learning_rate, 0.0, "cosine",
                                              cfg.warmup_steps, cfg.steps)
        start = self.resume(student, optimizer, scheduler)
        stream = TrainingStream([(self.train, 1.0)], cfg.batch_size, seed=cfg.seed)
        started = time.time()
        n_student, n_teacher = count_parameters(student), count_parameters(self.teacher.model)
        with progress_bar(f"distilling a {n_student / 1e6:.1f}M companion", cfg.steps) as advance:
            advance(start)
            for step in range(start, cfg.steps):
                kl = train_step(student, stream.batch(step), optimizer, scheduler, 1.0, device, loss_fn=self.loss)
                advance(info=f"top-{cfg.top_k} KL {kl:.3f}")
                done = step + 1
                if done % cfg.checkpoint_every == 0 and done < cfg.steps:
                    self.save_checkpoint(done, student, optimizer, scheduler)
        student.eval()
        with console.status("perplexity of the teacher and the companion on the text's test split"):
            report = {"teacher_ppl": perplexity(mean_loss(self.teacher.model, self.test, device, cfg.batch_size)),
                      "companion_ppl": perplexity(mean_loss(student, self.test, device, cfg.batch_size))}
        report.update(init=cfg.init, **self.init_report, test_blocks=len(self.test), companion_params=n_student,
                      teacher_params=n_teacher,
                      param_ratio=n_student / n_teacher, resumed_from_step=start,
                      train_seconds=round(time.time() - started, 1))
        with atomic_dir(self.out, overwrite=True) as tmp:
            student.save_pretrained(tmp, safe_serialization=True)
            self.teacher.tokenizer.save_pretrained(tmp)
            (tmp / DISTILL_FILE).write_text(json.dumps(
                {"teacher": self.teacher.identity(), "text": self.text, "recipe": cfg.model_dump(), "report": report},
                indent=2) + "\n", encoding="utf-8")
        shutil.rmtree(self.checkpoints, ignore_errors=True)
        return report


def distill(teacher: str, text: str | Path, out: str | Path, config: DistillConfig | None = None,
            device: str | None = None, force: bool = False) -> dict:
    """Distill a companion of `teacher` on `text` into `out`; returns the perplexity report."""
    out, text = Path(out), Path(text)
    if (out / "config.json").exists() and not force:
        raise ExpertkitError(f"{out} already holds a model; pass --force to replace it, or choose another --out")
    if Path(teacher).exists() and out.resolve() == Path(teacher).resolve():
        raise ExpertkitError("--out is the teacher's own folder; choose another folder for the companion")
    if not text.exists():
        raise ExpertkitError(f"--text {text} not found: give a text file, or a folder of them (train/valid/test "
                             "files are used as given, otherwise split by hash)")
    ensure_writable_dir(out.parent, "output folder")
    run = DistillRun(load_base(teacher, str(pick_device(device))), text, out, config or DistillConfig())
    return run.run()
