"""The composition interface: token ids in, next-token logits out, prefill then one step per token.

Everything that runs a model for an answer (the generation loop, scoring, the server engine) drives
this interface only; compose/ holds the strategies that implement it.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch

from expertkit.errors import ExpertkitError
from expertkit.runtime.state import DecodeState, RowAdapter


class Composition(ABC):
    """Given token ids, return next-token logits. Rows are left-padded; `attention_mask` marks real tokens."""

    name: str
    # True when the answer for a row depends on that row's whole prompt (a router reads it to choose):
    # scored on tokens of its own prompt it would see what it is scored on, so scoring feeds it a prefix
    # and steps through the rest (see scoring.continuation_log_probs).
    decides_from_prompt: bool = False

    @abstractmethod
    def prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                keep_last: int | None = None) -> tuple[torch.Tensor, DecodeState]:
        """Logits [B, T, V] for every position (perplexity needs all of them), plus the state to continue.

        `keep_last`: the caller reads only the last `keep_last` positions (generation: 1; scoring a continuation:
        its length): [B, keep_last, V], which spares the model's head and T x V memory for the rest.
        """

    @abstractmethod
    def step(self, state: DecodeState, next_ids: torch.Tensor) -> tuple[torch.Tensor, DecodeState]:
        """Logits [B, V] for one new token per row, reusing the caches."""

    def configured(self, **params) -> "Composition":
        """This composition with per-request parameters (a collaboration's alpha, say); none by default."""
        if params:
            raise ExpertkitError(f"'{self.name}' takes no parameters; got {sorted(params)}")
        return self

    def pool_rows(self, pool) -> RowAdapter | None:
        """The adapter (or mix) of `pool` that every row of this composition is answered by, if that is all it
        does: a server may then prefill its rows together with other such rows in one mixed-adapter forward."""
        return None

    def stats(self) -> dict:
        """Counters worth reporting after a run (e.g. the share of tokens a collaboration deferred); none here."""
        return {}
