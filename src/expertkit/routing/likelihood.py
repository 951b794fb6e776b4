"""Likelihood router: the label (expert, or the bare base) under which the prompt has the lowest loss.

BTM's domain posterior with a uniform prior, computed from the mean per-token
loss rather than the summed one: the sum makes every long prompt certain, so a
fixed confidence threshold would mean different things at different lengths.
The fitted numbers are the temperature that turns loss gaps into
probabilities and a log-prior per label (Bayes' prior, learned from the
training prompts: without it, text that an expert trained with replay predicts
a little better than the base would never reach the base). All labels are
scored in one mixed-adapter forward.
"""

from __future__ import annotations

import torch

from expertkit.routing.base import (BASE, Prompts, Router, TrainingData, fit_prior, fit_temperature,
                                    register_router)
from expertkit.routing.features import mean_token_nll
from expertkit.runtime import BASE_ADAPTER


@register_router("likelihood")
class LikelihoodRouter(Router):
    @classmethod
    def fit(cls, pool, data: TrainingData, settings) -> "LikelihoodRouter":
        router = cls(data.labels, {}, {"temperature": 1.0})
        scores = router.scores(pool, data.prompts, settings)
        temperature = fit_temperature(scores, data.targets)
        router.params["temperature"] = temperature
        router.tensors["prior"] = fit_prior(scores, data.targets, temperature)
        return router

    def scores(self, pool, prompts: Prompts, settings) -> torch.Tensor:
        adapters = [BASE_ADAPTER if label == BASE else label for label in self.labels]
        return -mean_token_nll(pool, prompts, adapters, settings)

    def probabilities(self, pool, prompts: Prompts, settings) -> torch.Tensor:
        prior = self.tensors.get("prior", torch.zeros(len(self.labels)))  # routers saved before the prior: none
        return torch.softmax(self.scores(pool, prompts, settings) / self.params["temperature"] + prior, dim=-1)
