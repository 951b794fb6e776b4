"""Arrow router: data-free routing from the LoRA weights themselves (Ostapenko et al., 2024).

Each expert's prototype in each LoRA layer is the top right singular vector of
its ΔW = B·A: the input direction the expert changes most. A prompt's affinity
to an expert is |cos(input, prototype)| averaged over its tokens and over the
layers. PEFT's ArrowConfig routes every token inside every layer (a per-token
mixture), which cannot pick one adapter for a whole sequence, so this module
computes the same prototypes exactly (QR + SVD, no random power iteration) and
pools the affinities per prompt.

Nothing here is fitted on text; only the abstain threshold is calibrated.
"""

from __future__ import annotations

import torch

from expertkit.errors import ExpertkitError
from expertkit.routing.base import Prompts, Router, TrainingData, register_router
from expertkit.routing.features import map_batches
from expertkit.runtime import BASE_ADAPTER
from expertkit.runtime.tokens import position_ids

TEMPERATURE = 0.01  # affinities are mean |cos| values a few hundredths apart


def lora_modules(model, experts: list[str]) -> dict[str, torch.nn.Module]:
    """LoRA layers (by module name) in which every expert has weights."""
    found = {name: m for name, m in model.named_modules()
             if hasattr(m, "lora_A") and hasattr(m, "lora_B") and all(e in m.lora_A for e in experts)}
    if not found:
        raise ExpertkitError(f"no LoRA layer holds all of {experts}; an Arrow router needs LoRA experts")
    return found


def prototypes(module, experts: list[str]) -> torch.Tensor:
    """[K, in] top right singular vector of each expert's ΔW = B·A, without forming ΔW (B = QR, SVD of R·A)."""
    out = []
    for e in experts:
        _, r = torch.linalg.qr(module.lora_B[e].weight.detach().float())
        out.append(torch.linalg.svd(r @ module.lora_A[e].weight.detach().float(), full_matrices=False).Vh[0])
    return torch.stack(out)


@register_router("arrow")
class ArrowRouter(Router):
    @classmethod
    def fit(cls, pool, data: TrainingData, settings) -> "ArrowRouter":
        experts = data.labels[:-1]
        pool.ensure(experts)
        loaded = pool.resolve(experts)  # the PEFT names of the experts' current versions
        tensors = {name: prototypes(m, loaded) for name, m in lora_modules(pool.model, loaded).items()}
        return cls(data.labels, tensors, {"temperature": TEMPERATURE})

    @torch.no_grad()
    def affinities(self, pool, prompts: Prompts, settings) -> torch.Tensor:
        """[N, K] mean over layers and real tokens of |cos(layer input, prototype)|."""
        modules = dict(pool.model.named_modules())
        missing = [n for n in self.tensors if n not in modules]
        if missing:
            raise ExpertkitError(f"the model has no LoRA layer '{missing[0]}' that this Arrow router was built on; "
                                 "retrain the router on this library")

        def mean_affinity(ids, mask):
            weights = mask.to(pool.device).float().unsqueeze(-1)
            total = torch.zeros(len(ids), len(self.experts), device=pool.device)

            def collect(name):
                def hook(module, args):
                    nonlocal total
                    x = args[0].float()
                    cos = (x / x.norm(dim=-1, keepdim=True).clamp(min=1e-8)) @ self.tensors[name].to(x.device).T
                    total = total + (cos.abs() * weights).sum(1) / weights.sum(1)
                return hook

            handles = [modules[n].register_forward_pre_hook(collect(n)) for n in self.tensors]
            try:
                pool.forward(ids, mask, [BASE_ADAPTER] * len(ids), position_ids=position_ids(mask))
            finally:
                for h in handles:
                    h.remove()
            return (total / len(self.tensors)).cpu()

        return map_batches(pool, prompts, settings, mean_affinity)

    def probabilities(self, pool, prompts: Prompts, settings) -> torch.Tensor:
        pool.ensure(self.experts)
        probs = torch.softmax(self.affinities(pool, prompts, settings) / self.params["temperature"], dim=-1)
        return torch.cat([probs, torch.zeros(len(probs), 1)], dim=1)  # the base is reached by abstaining only
