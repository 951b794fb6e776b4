"""Turn merged ΔW tensors into library files: a rank-r LoRA adapter (truncated SVD) or a full HF model."""

from __future__ import annotations

import json
from pathlib import Path

import torch

LORA_PREFIX = "base_model.model."


def factor(delta: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """ΔW ≈ B · A with B: [out, rank], A: [rank, in] (singular values split evenly); relative Frobenius error."""
    u, s, vh = torch.linalg.svd(delta.double(), full_matrices=False)
    r = min(rank, s.numel())
    root = s[:r].sqrt()
    b = torch.zeros(delta.shape[0], rank, dtype=torch.float64)
    a = torch.zeros(rank, delta.shape[1], dtype=torch.float64)
    b[:, :r] = u[:, :r] * root
    a[:r] = root[:, None] * vh[:r]
    norm = torch.linalg.norm(delta.double())
    error = float(torch.linalg.norm(delta.double() - b @ a) / norm) if norm > 0 else 0.0
    return b.float().contiguous(), a.float().contiguous(), error


def lora_factors(merged: dict[str, torch.Tensor], rank: int, template_config: dict):
    """PEFT adapter config + tensors (scale 1: lora_alpha = r) and the per-module reconstruction error."""
    fan_in_fan_out = bool(template_config.get("fan_in_fan_out"))
    tensors, errors = {}, {}
    for module, delta in merged.items():
        b, a, errors[module] = factor(delta.T if fan_in_fan_out else delta, rank)
        tensors[f"{LORA_PREFIX}{module}.lora_A.weight"] = a
        tensors[f"{LORA_PREFIX}{module}.lora_B.weight"] = b
    config = {**template_config, "r": rank, "lora_alpha": rank, "use_rslora": False, "rank_pattern": {},
              "alpha_pattern": {}, "lora_dropout": 0.0, "inference_mode": True}
    return config, tensors, errors


def write_adapter(folder: Path, config: dict, tensors: dict[str, torch.Tensor]) -> None:
    from safetensors.torch import save_file

    (folder / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    save_file(tensors, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})


@torch.no_grad()
def write_full_model(folder: Path, base_path: str, merged: dict[str, torch.Tensor]) -> None:
    """Base weights + merged ΔW, saved as a plain HF model dir (loads with AutoModelForCausalLM)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32, use_safetensors=True)
    for module, delta in merged.items():
        weight = model.get_submodule(module).weight
        weight.add_(delta.to(weight.dtype))
    model.save_pretrained(folder, safe_serialization=True)
    AutoTokenizer.from_pretrained(base_path).save_pretrained(folder)
