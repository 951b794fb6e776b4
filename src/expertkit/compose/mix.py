"""Token-level mixture (BTM / DEMix ensemble): p(x_t) = sum_k p(k | x_<t) p_k(x_t | x_<t).

Every component (each named entry, and the base unless excluded) is a composition of its own
(compose/nesting.py): adapters of the pool run on their own copies of each row in one mixed-adapter
batch, each with its KV cache; any other entry (a full merged model, a router) runs as itself. The
posterior starts uniform and is updated by each component's likelihood of the
tokens seen so far, so the logits at position t depend only on tokens <= t
(perplexity stays honest); only the top-k components by posterior are mixed.
The returned "logits" are log-probabilities, whose softmax is the mixture.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from pydantic import ValidationError

from expertkit.compose.base import register
from expertkit.compose.nesting import Stack, entry_composition
from expertkit.config import MixtureConfig, format_validation_error
from expertkit.errors import ExpertkitError
from expertkit.library import BASE, MIXTURE_SPEC, Entry, Kind, Library
from expertkit.runtime import Composition, ExpertPool
from expertkit.runtime.tokens import real_rows


def prefix_evidence(log_probs: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                    log_prior: torch.Tensor) -> torch.Tensor:
    """[B, C, T] log prior + each component's log-likelihood of the real tokens up to and including t.

    log_probs [B, C, T, V] are each component's next-token log-probabilities; position t's evidence
    uses tokens <= t only, so it may weigh the prediction of token t+1 without peeking at it.
    """
    rows, n, width, _ = log_probs.shape
    ids, mask = input_ids.to(log_probs.device), attention_mask.to(log_probs.device)
    seen = torch.zeros(rows, n, width, device=log_probs.device)
    next_ids = ids[:, None, 1:, None].expand(rows, n, width - 1, 1)
    scored = (mask[:, 1:] * mask[:, :-1]).float()[:, None]  # a real token predicted from a real one
    seen[:, :, 1:] = log_probs[:, :, :-1].gather(-1, next_ids).squeeze(-1) * scored
    return log_prior.to(seen.device)[None, :, None] + seen.cumsum(-1)


def next_evidence(evidence: torch.Tensor, last_log_probs: torch.Tensor, next_ids: torch.Tensor) -> torch.Tensor:
    """[B, C] evidence after one more token, from each component's previous prediction [B, C, V]."""
    rows, n = evidence.shape
    picked = last_log_probs.gather(-1, next_ids.to(last_log_probs.device).view(rows, 1, 1).expand(rows, n, 1))
    return evidence + picked.squeeze(-1)


def top_k_log_posterior(evidence: torch.Tensor, top_k: int) -> torch.Tensor:
    """Normalised log posterior over the last dim, keeping only the top_k components (others -inf)."""
    if top_k < evidence.shape[-1]:
        keep = torch.zeros_like(evidence, dtype=torch.bool).scatter(-1, evidence.topk(top_k, dim=-1).indices, True)
        evidence = evidence.masked_fill(~keep, float("-inf"))
    return evidence - evidence.logsumexp(dim=-1, keepdim=True)


@dataclass
class MixtureState:
    """The components' state (opaque: never rows a server may step as plain rows of the pool), plus
    each row's running evidence for each component."""

    components: object  # the Stack's state
    evidence: torch.Tensor  # [B, C] log prior + log-likelihood of the tokens so far
    last_log_probs: torch.Tensor  # [B, C, V] each component's prediction of the next token


class MixtureComposition(Composition):
    def __init__(self, pool: ExpertPool, components: list[Composition], top_k: int | None, name: str):
        if not components:
            raise ExpertkitError(f"mixture '{name}' has no components; name some experts or include the base")
        self.pool, self.components, self.name = pool, Stack(pool, components), name
        self.top_k = min(top_k or len(components), len(components))
        self.log_prior = torch.full((len(components),), -math.log(len(components)))

    def _mix(self, evidence: torch.Tensor, log_probs: torch.Tensor) -> torch.Tensor:
        """evidence [..., C], log_probs [..., C, V] -> mixture log-probabilities [..., V]."""
        return (top_k_log_posterior(evidence, self.top_k).unsqueeze(-1) + log_probs).logsumexp(dim=-2)

    def prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, keep_last: int | None = None):
        real_rows(input_ids, attention_mask, self.pool.context_length)
        logits, inner = self.components.prefill(input_ids, attention_mask)
        log_probs = torch.log_softmax(logits.float(), dim=-1)  # [B, C, T, V]
        evidence = prefix_evidence(log_probs, input_ids, attention_mask, self.log_prior)  # [B, C, T]
        if keep_last:  # the evidence needs every position; the mixture only the last ones
            mixed = self._mix(evidence[:, :, -keep_last:].transpose(1, 2),
                              log_probs[:, :, -keep_last:].transpose(1, 2))
        else:
            mixed = self._mix(evidence.transpose(1, 2), log_probs.transpose(1, 2))
        return mixed, MixtureState(inner, evidence[:, :, -1], log_probs[:, :, -1])

    def step(self, state: MixtureState, next_ids: torch.Tensor):
        evidence = next_evidence(state.evidence, state.last_log_probs, next_ids)
        logits, inner = self.components.step(state.components, next_ids)
        log_probs = torch.log_softmax(logits.float(), dim=-1)  # [B, C, V]
        return self._mix(evidence, log_probs), MixtureState(inner, evidence, log_probs)


def mixture_experts(library: Library, spec: MixtureConfig, name: str) -> list[str]:
    """The spec's entries (any kind but a mixture), or every expert in the library; each must be there."""
    if spec.experts is None:
        return [e.name for e in library.entries(Kind.EXPERT)]
    missing = [e for e in spec.experts if not library.has_name(e)]
    if missing:
        raise ExpertkitError(f"mixture '{name}' names {missing}, which library {library.root} does not hold; "
                             "recreate it with `expertkit mixture add` or restore those experts")
    nested = [e for e in spec.experts if library.get(e).kind == Kind.MIXTURE]
    if nested:
        raise ExpertkitError(f"mixture '{name}' names the mixture(s) {nested}; a mixture mixes experts, merges, "
                             "merged models or routers, not other mixtures: name their experts instead")
    return list(spec.experts)


def add_mixture(library: Library, name: str, spec: MixtureConfig, overwrite: bool = False) -> Entry:
    experts = mixture_experts(library, spec, name)

    def write(tmp: Path) -> None:
        (tmp / MIXTURE_SPEC).write_text(json.dumps(spec.model_dump(), indent=2) + "\n", encoding="utf-8")

    return library.add_entry(Kind.MIXTURE, name, write, {"experts": experts, **spec.model_dump(exclude={"experts"})},
                             overwrite=overwrite)


@register(Kind.MIXTURE)
def mixture_composition(pool: ExpertPool, entry) -> Composition:
    path = entry.path / MIXTURE_SPEC
    try:
        spec = MixtureConfig.model_validate(json.loads(path.read_text(encoding="utf-8")))
    except ValidationError as e:
        raise ExpertkitError(format_validation_error(e, str(path))) from None
    names = mixture_experts(pool.library, spec, entry.name) + ([BASE] if spec.include_base else [])
    pool.ensure([n for n in names if n != BASE])
    return MixtureComposition(pool, [entry_composition(pool, n) for n in names], spec.top_k, entry.name)
