"""Embedding router: nearest domain centroid of the base model's mean-pooled hidden states.

RouterRetriever's pilot embeddings, with the base model itself as the encoder
(no extra model to download). Which layer separates domains best differs
between models (a barely trained one separates them only in its embeddings),
so the layer whose centroids best classify the training prompts is chosen.
States are centred on their mean over the training prompts before cosine
similarity: raw hidden states share one large direction that would otherwise
make every centroid look alike.
"""

from __future__ import annotations

import torch

from expertkit.routing.base import Prompts, Router, TrainingData, fit_temperature, register_router
from expertkit.routing.features import mean_hidden_states


def _unit(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=-1, keepdim=True).clamp(min=1e-8)


def _centroids(unit: torch.Tensor, targets: torch.Tensor, n_labels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[L, H] unit centroid per label, and which labels had any prompts."""
    centroids = torch.zeros(n_labels, unit.shape[1])
    present = torch.zeros(n_labels, dtype=torch.bool)
    for i in range(n_labels):
        rows = targets == i
        if rows.any():
            centroids[i], present[i] = _unit(unit[rows].mean(0)), True
    return centroids, present


def _similarities(unit: torch.Tensor, centroids: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
    return (unit @ centroids.T).masked_fill(~present.bool(), float("-inf"))


@register_router("embedding")
class EmbeddingRouter(Router):
    @classmethod
    def fit(cls, pool, data: TrainingData, settings) -> "EmbeddingRouter":
        states = mean_hidden_states(pool, data.prompts, settings)  # [N, layers + 1, H]
        best = None
        for layer in range(states.shape[1]):
            center = states[:, layer].mean(0)
            unit = _unit(states[:, layer] - center)
            centroids, present = _centroids(unit, data.targets, len(data.labels))
            sims = _similarities(unit, centroids, present)
            correct = int((sims.argmax(-1) == data.targets).sum())
            if best is None or correct > best[0]:
                best = (correct, layer, center, centroids, present, sims)
        _, layer, center, centroids, present, sims = best
        tensors = {"center": center, "centroids": centroids, "present": present}
        return cls(data.labels, tensors, {"layer": layer, "temperature": fit_temperature(sims, data.targets)})

    def probabilities(self, pool, prompts: Prompts, settings) -> torch.Tensor:
        states = mean_hidden_states(pool, prompts, settings)[:, self.params["layer"]]
        sims = _similarities(_unit(states - self.tensors["center"]), self.tensors["centroids"], self.tensors["present"])
        return torch.softmax(sims / self.params["temperature"], dim=-1)
