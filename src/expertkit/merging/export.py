"""Turn merged ΔW tensors into library files: a rank-r LoRA adapter (truncated SVD) or a full HF model.

Every tensor is checked finite before anything is written, so a bad merge (weights summing to zero, an
overflowing λ, a NaN in an expert) is refused instead of saved.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from expertkit.errors import ExpertkitError

LORA_PREFIX = "base_model.model."


def require_finite(tensors: dict[str, torch.Tensor], what: str) -> None:
    bad = [name for name, tensor in tensors.items() if not torch.isfinite(tensor).all()]
    if bad:
        raise ExpertkitError(f"{what} has non-finite values (NaN or inf) in {len(bad)} tensors (first: {bad[0]}), "
                             "so nothing was written; check the recipe's weights and lambda, and that the experts "
                             "are finite")


def truncation_errors(delta: torch.Tensor) -> torch.Tensor:
    """errors[r]: relative Frobenius error of the best rank-r approximation, r = 0 .. min(shape) (Eckart-Young)."""
    energy = torch.linalg.svdvals(delta.double()).square()
    tail = torch.cat([energy.flip(0).cumsum(0).flip(0), energy.new_zeros(1)])
    total = energy.sum()
    return (tail / total).sqrt() if total > 0 else torch.zeros_like(tail)


def smallest_rank(merged: dict[str, torch.Tensor], bound: float) -> int:
    """The smallest rank (at least 1) that keeps every module's truncation error within `bound`."""
    return max(1, *(int(torch.nonzero(truncation_errors(d) <= bound)[0]) for d in merged.values()))


def factor(delta: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """ΔW ≈ B · A with B: [out, rank], A: [rank, in] (singular values split evenly), and the relative
    Frobenius error of the float32 factors as stored."""
    u, s, vh = torch.linalg.svd(delta.double(), full_matrices=False)
    r = min(rank, s.numel())
    root = s[:r].sqrt()
    b = torch.zeros(delta.shape[0], rank, dtype=torch.float64)
    a = torch.zeros(rank, delta.shape[1], dtype=torch.float64)
    b[:, :r] = u[:, :r] * root
    a[:r] = root[:, None] * vh[:r]
    b, a = b.float().contiguous(), a.float().contiguous()
    norm = torch.linalg.norm(delta.double())
    error = float(torch.linalg.norm(delta.double() - b.double() @ a.double()) / norm) if norm > 0 else 0.0
    return b, a, error


def lora_factors(merged: dict[str, torch.Tensor], rank: int, template_config: dict):
    """PEFT adapter config + tensors (scale 1: lora_alpha = r) and the per-module reconstruction error."""
    fan_in_fan_out = bool(template_config.get("fan_in_fan_out"))
    tensors, errors = {}, {}
    for module, delta in merged.items():
        b, a, errors[module] = factor(delta.T if fan_in_fan_out else delta, rank)
        tensors[f"{LORA_PREFIX}{module}.lora_A.weight"] = a
        tensors[f"{LORA_PREFIX}{module}.lora_B.weight"] = b
    require_finite(tensors, "the merged adapter")
    config = {**template_config, "r": rank, "lora_alpha": rank, "use_rslora": False, "rank_pattern": {},
              "alpha_pattern": {}, "lora_dropout": 0.0, "inference_mode": True}
    return config, tensors, errors


def write_adapter(folder: Path, config: dict, tensors: dict[str, torch.Tensor]) -> None:
    from safetensors.torch import save_file

    (folder / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    save_file(tensors, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})


@torch.no_grad()
def full_model(base_path: str, merged: dict[str, torch.Tensor]):
    """The base (float32) with the merged ΔW added, checked finite, and each module's relative error of the
    ΔW it now holds (float32 rounding of W + ΔW)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32, use_safetensors=True)
    errors = {}
    for module, delta in merged.items():
        weight = model.get_submodule(module).weight
        before = weight.double()
        weight.add_(delta.to(weight.dtype))
        norm = torch.linalg.norm(delta.double())
        held = weight.double() - before
        errors[module] = float(torch.linalg.norm(held - delta.double()) / norm) if norm > 0 else 0.0
    require_finite(dict(model.named_parameters()), "the merged model")
    return model, errors


def write_full_model(folder: Path, base_path: str, model) -> None:
    """A plain HF model dir (loads with AutoModelForCausalLM), with the base's tokenizer."""
    from transformers import AutoTokenizer

    model.save_pretrained(folder, safe_serialization=True)
    AutoTokenizer.from_pretrained(base_path).save_pretrained(folder)
