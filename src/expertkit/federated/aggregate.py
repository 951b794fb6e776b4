"""The server's arithmetic on client updates: weighted mean, clipping, Gaussian noise, and ΔW for checks.

An update is a dict of tensors (the trained factor's change this round, by PEFT state-dict name).
"""

from __future__ import annotations

import torch

Update = dict[str, torch.Tensor]


def weighted_mean(updates: list[Update], weights: list[float]) -> Update:
    """Σ w_k u_k / Σ w_k, in float64 so the mean is exact to float32 precision."""
    total = float(sum(weights))
    return {name: (sum(w * u[name].double() for u, w in zip(updates, weights)) / total).float()
            for name in updates[0]}


def norm(update: Update) -> float:
    return float(torch.sqrt(sum((t.double() ** 2).sum() for t in update.values())))


def clip(update: Update, max_norm: float) -> tuple[Update, float]:
    """Scale the update so its L2 norm (over all tensors together) is at most max_norm; returns its norm before."""
    n = norm(update)
    factor = min(1.0, max_norm / max(n, 1e-12))
    return {k: t * factor for k, t in update.items()}, n


def noisy_mean(updates: list[Update], std: float, denominator: int, generator: torch.Generator) -> Update:
    """(Σ u_k + N(0, std²)) / denominator: DP-FedAvg's server step (a fixed denominator: the invited clients)."""
    summed = {name: sum(u[name].double() for u in updates) for name in updates[0]}
    return {name: ((t + std * torch.randn(t.shape, generator=generator, dtype=torch.float64)) / denominator).float()
            for name, t in summed.items()}


def add(state: Update, update: Update) -> Update:
    """The global adapter after a round: the trained factor moved by the aggregated update, the rest unchanged."""
    return {name: t + update[name] if name in update else t.clone() for name, t in state.items()}


def delta_weights(state: Update, scale: float) -> dict[str, torch.Tensor]:
    """ΔW = scale·B·A of every adapted module (keys: the module's name), from a PEFT adapter state dict."""
    out = {}
    for name, a in state.items():
        if ".lora_A." in name:
            module = name.split(".lora_A.")[0]
            b = state[name.replace(".lora_A.", ".lora_B.")]
            out[module] = scale * (b.double() @ a.double())
    return out
