"""Embedding router: nearest domain centroid of the base model's mean-pooled hidden states.

RouterRetriever's pilot embeddings, with the base model itself as the encoder
(no extra model to download). Embeddings are centred on the mean over all
training prompts before cosine similarity: raw hidden states share one large
common direction that would otherwise make every centroid look alike.
"""

from __future__ import annotations

import torch

from expertkit.routing.base import Prompts, Router, TrainingData, fit_temperature, register_router
from expertkit.routing.features import mean_hidden_states


def _unit(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=-1, keepdim=True).clamp(min=1e-8)


@register_router("embedding")
class EmbeddingRouter(Router):
    @classmethod
    def fit(cls, pool, data: TrainingData, settings) -> "EmbeddingRouter":
        embeddings = mean_hidden_states(pool, data.prompts, settings)
        center = embeddings.mean(0)
        unit = _unit(embeddings - center)
        centroids = torch.zeros(len(data.labels), unit.shape[1])
        present = torch.zeros(len(data.labels), dtype=torch.bool)
        for i in range(len(data.labels)):
            rows = data.targets == i
            if rows.any():
                centroids[i], present[i] = _unit(unit[rows].mean(0)), True
        router = cls(data.labels, {"center": center, "centroids": centroids, "present": present}, {"temperature": 1.0})
        router.params["temperature"] = fit_temperature(router.similarities(unit), data.targets)
        return router

    def similarities(self, unit: torch.Tensor) -> torch.Tensor:
        sims = unit @ self.tensors["centroids"].T
        return sims.masked_fill(~self.tensors["present"].bool(), float("-inf"))

    def probabilities(self, pool, prompts: Prompts, settings) -> torch.Tensor:
        unit = _unit(mean_hidden_states(pool, prompts, settings) - self.tensors["center"])
        return torch.softmax(self.similarities(unit) / self.params["temperature"], dim=-1)
