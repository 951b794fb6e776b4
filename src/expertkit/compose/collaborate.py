"""Collaborative decoding: a small domain expert steers a large general model at decoding time.

- proxy (proxy-tuning / emulated fine-tuning): log p ∝ large + α · (small_expert − small_base);
- fusion: several experts at once, log p ∝ large + α · Σ_k w_k (expert_k − small_base), with w the
  experts' posterior given the prefix (BTM's domain posterior), updated as tokens arrive;
- defer (FS-GEN / Co-LLM): the small expert answers, except where its predictive entropy exceeds a
  threshold; there the large model's distribution is used.

Each strategy is registered by name with its parameter model from config.py
(`@collaboration("proxy", ProxyParams)`) and built from a spec, `build_collaboration("proxy:code",
large, small)`; `collaboration_names(small.adapter_names)` lists the specs small experts offer, which
`compose.catalog` adds to the entries a scorecard or a server can name. `configured(alpha=...)` gives
the same composition with per-request parameters.

The large model's weights are never touched. The small model's rows (expert and anti-expert) come
from ONE batched forward (PEFT per-row `adapter_names`), so its weights are held once and paid once
per step; both models keep KV caches. Each strategy returns log-probabilities, whose softmax is the
combined distribution, through the ordinary Composition interface.
"""

from __future__ import annotations

import copy
from abc import abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from pydantic import BaseModel, ValidationError

from expertkit.base import companion_teacher, identity_mismatch, load_base
from expertkit.compose.mix import next_evidence, prefix_evidence
from expertkit.compose.vocab import TextAlignment, TokenMap, resolve_token_map
from expertkit.config import DeferParams, FusionParams, ProxyParams, format_validation_error, load_config
from expertkit.errors import ExpertkitError
from expertkit.library import Library
from expertkit.registry import Registry
from expertkit.runtime import BASE_ADAPTER, Composition, ExpertPool, PoolState
from expertkit.runtime.lean import LeanState


def check_collaborators(large: ExpertPool, small: ExpertPool, experts: list[str],
                        token_map: TokenMap | TextAlignment | str | Path | None = None
                        ) -> TokenMap | TextAlignment | None:
    """Every expert loaded on the small base, a companion of this very large model, and how the vocabularies
    align: None when they are one vocabulary, else `token_map` ("text" by default, see compose.vocab)."""
    missing = [e for e in experts if e not in small.adapter_names]
    if missing:
        raise ExpertkitError(f"expert(s) {missing} are not loaded on the small model '{small.base.name}' "
                             f"(loaded: {small.adapter_names}); use experts trained on that small base")
    teacher = companion_teacher(small.base.name) if Path(small.base.name).is_dir() else None
    if teacher is not None and identity_mismatch(large.base.identity(), teacher):
        raise ExpertkitError(f"the small model '{small.base.name}' was distilled from '{teacher.get('name')}', not "
                             f"from the large model '{large.base.name}' (their weights differ); distill a companion "
                             f"of this model: expertkit base distill --teacher {large.base.name}")
    if large.base.identity()["tokenizer_hash"] == small.base.identity()["tokenizer_hash"]:
        return None
    return resolve_token_map(token_map, large, small)


def checked_params(model: type[BaseModel], values: dict, owner: str) -> BaseModel:
    """`values` as the strategy's parameter model; a wrong name or value is the caller's error, said plainly."""
    unknown = sorted(set(values) - set(model.model_fields))
    if unknown:
        raise ExpertkitError(f"strategy '{owner.partition(':')[0]}' takes no parameter(s) {unknown}; it takes "
                             f"{sorted(model.model_fields) or 'none'}")
    try:
        return model.model_validate(values)
    except ValidationError as e:
        raise ExpertkitError(format_validation_error(e, f"parameters of '{owner}'")) from None


class Parameterized:
    """A composition whose parameters (its config.py model `Params`, held in `self.params`) a request may set,
    and (`token_map`) how it aligns the two models' vocabularies."""

    name: str
    Params: type[BaseModel]
    params: BaseModel

    def configured(self, token_map: str | None = None, **given) -> Composition:
        if not given and token_map is None:
            return self
        other = copy.copy(self)
        if given:
            other.params = checked_params(type(self.params), {**self.params.model_dump(), **given}, self.name)
        if token_map is not None:
            other.align_by(token_map)
        return other

    @abstractmethod
    def align_by(self, token_map: str) -> None:
        """Use this vocabulary alignment ('text' or 'vocab'; see compose.vocab), or refuse it."""


@dataclass
class CollaborationState:
    """Both models' caches, and what a strategy carries between steps (fusion: its running evidence)."""

    large: PoolState
    small: PoolState | LeanState
    memory: object = None


class Collaboration(Parameterized, Composition):
    """The large model (bare) and the small model on `small_adapters`, one batched small forward per step.

    A strategy says how the two models' log-probabilities combine after the prompt (`start`) and after
    each new token (`advance`), carrying what it needs between them; one that combines each position on
    its own subclasses `PositionwiseCollaboration` and writes only `combine`.
    Options every strategy takes: `token_map` (when the vocabularies differ, see compose.vocab) and
    `fast_small` (decode steps of the small model with runtime.lean; False keeps the HF/PEFT step).
    """

    def __init__(self, large: ExpertPool, small: ExpertPool, small_adapters: list[str], name: str,
                 token_map: TokenMap | TextAlignment | str | Path | None = None, fast_small: bool = True,
                 **params):
        self.params = checked_params(self.Params, params, name)
        self.token_map = check_collaborators(large, small, [a for a in small_adapters if a != BASE_ADAPTER],
                                             token_map)
        self.large, self.small, self.small_adapters, self.name = large, small, small_adapters, name
        self.fast_small = fast_small
        self._alignments: dict[str, object] = {}  # per-request alignments, built once (shared by configured copies)

    @abstractmethod
    def start(self, large_lp, small_lp, input_ids: torch.Tensor, real: torch.Tensor):
        """After the prompt: (log-probs [B, T, V], memory for the steps).

        large_lp [B, T, V], small_lp [k, B, T, V] (one slice per small adapter); `real` marks non-padding.
        """

    @abstractmethod
    def advance(self, large_lp, small_lp, next_ids: torch.Tensor, memory):
        """After one more token per row: (log-probs [B, V], memory)."""

    def align_by(self, token_map: str) -> None:
        if token_map not in self._alignments:
            self._alignments[token_map] = check_collaborators(self.large, self.small, [], token_map)
        self.token_map = self._alignments[token_map]

    def _small_rows(self, rows: int) -> list[str]:
        return [a for a in self.small_adapters for _ in range(rows)]

    def _log_probs(self, large_logits: torch.Tensor, small_logits: torch.Tensor, rows: int):
        k = len(self.small_adapters)
        small_lp = torch.log_softmax(small_logits.float(), -1).view(k, rows, *small_logits.shape[1:])
        if self.token_map is not None:
            small_lp = self.token_map.to_large(small_lp)
        return torch.log_softmax(large_logits.float(), -1), small_lp.to(large_logits.device)

    def _readable(self, log_probs: torch.Tensor) -> torch.Tensor:
        """With a token map, only tokens both models can read may be generated."""
        return self.token_map.mask_unmapped(log_probs) if self.token_map is not None else log_probs

    def _read_prompt(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, rows: int):
        k = len(self.small_adapters)
        ids, mask, adapters = input_ids.repeat(k, 1), attention_mask.repeat(k, 1), self._small_rows(rows)
        if self.token_map is None:
            return self.small.prefill(ids, mask, adapters)
        return self.token_map.read_prompt(self.small, ids, mask, adapters, rows)

    def _read_next(self, state, next_ids: torch.Tensor):
        ids = next_ids.repeat(len(self.small_adapters))
        if self.token_map is None:
            return self.small.step(state, ids, lean=self.fast_small)
        return self.token_map.read_next(self.small, state, ids, lean=self.fast_small)

    def prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, keep_last: int | None = None):
        rows = input_ids.shape[0]
        large_logits, large = self.large.prefill(input_ids, attention_mask, [BASE_ADAPTER] * rows)
        small_logits, small = self._read_prompt(input_ids, attention_mask, rows)
        large_lp, small_lp = self._log_probs(large_logits, small_logits, rows)
        out, memory = self.start(large_lp, small_lp, input_ids, attention_mask.to(large_lp.device).bool())
        out = self._readable(out)
        return (out[:, -keep_last:] if keep_last else out), CollaborationState(large, small, memory)

    def step(self, state: CollaborationState, next_ids: torch.Tensor):
        rows = next_ids.shape[0]
        large_logits, large = self.large.step(state.large, next_ids)
        small_logits, small = self._read_next(state.small, next_ids)
        large_lp, small_lp = self._log_probs(large_logits, small_logits, rows)
        out, memory = self.advance(large_lp, small_lp, next_ids, state.memory)
        return self._readable(out), CollaborationState(large, small, memory)


class PositionwiseCollaboration(Collaboration):
    """A strategy whose combination at a position needs nothing from earlier positions (proxy, defer)."""

    @abstractmethod
    def combine(self, large_lp: torch.Tensor, small_lp: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
        """large_lp [B, ..., V], small_lp [k, B, ..., V] (one slice per small adapter) -> log-probs [B, ..., V].

        `real` [B, ...] marks the positions that are not padding.
        """

    def start(self, large_lp, small_lp, input_ids, real):
        return self.combine(large_lp, small_lp, real), None

    def advance(self, large_lp, small_lp, next_ids, memory):
        return self.combine(large_lp, small_lp, torch.ones(next_ids.shape[0], dtype=torch.bool,
                                                           device=large_lp.device)), memory


class ProxyComposition(PositionwiseCollaboration):
    """Proxy-tuning: the large model shifted by α times what tuning changed in the small model."""

    Params = ProxyParams

    def __init__(self, large: ExpertPool, small: ExpertPool, expert: str, name: str | None = None, **options):
        super().__init__(large, small, [expert, BASE_ADAPTER], name or f"proxy:{expert}", **options)

    def combine(self, large_lp, small_lp, real):
        expert, anti_expert = small_lp[0], small_lp[1]
        return large_lp + self.params.alpha * (expert - anti_expert)


@dataclass
class FusionEvidence:
    evidence: torch.Tensor  # [B, K] log prior + each expert's log-likelihood of the tokens so far
    last_log_probs: torch.Tensor  # [B, K, V] each expert's prediction of the next token


class FusionComposition(Collaboration):
    """Several small experts steer the large model, each weighted by its posterior given the prefix."""

    Params = FusionParams

    def __init__(self, large: ExpertPool, small: ExpertPool, experts: list[str], name: str = "fusion", **options):
        if not experts:
            raise ExpertkitError("fusion needs at least one expert")
        super().__init__(large, small, [*experts, BASE_ADAPTER], name, **options)
        self.log_prior = torch.full((len(experts),), -torch.log(torch.tensor(float(len(experts)))).item())

    def _by_row(self, small_lp: torch.Tensor) -> torch.Tensor:
        """[B, K, ..., V] the experts' log-probs per row (a token no expert can express is evidence for none)."""
        by_row = small_lp[:-1].transpose(0, 1)
        return by_row.masked_fill(by_row == float("-inf"), 0.0) if self.token_map is not None else by_row

    def _shifted(self, large_lp, small_lp, by_row, evidence):
        weights = torch.softmax(evidence, dim=1)  # [B, K, ...]
        shift = (weights.unsqueeze(-1) * (by_row - small_lp[-1].unsqueeze(1))).sum(1)
        return large_lp + self.params.alpha * shift

    def start(self, large_lp, small_lp, input_ids, real):
        by_row = self._by_row(small_lp)
        evidence = prefix_evidence(by_row, input_ids, real.long(), self.log_prior)  # [B, K, T]
        out = self._shifted(large_lp, small_lp, by_row, evidence)
        return out, FusionEvidence(evidence[:, :, -1], by_row[:, :, -1])

    def advance(self, large_lp, small_lp, next_ids, memory: FusionEvidence):
        by_row = self._by_row(small_lp)
        evidence = next_evidence(memory.evidence, memory.last_log_probs, next_ids)
        return self._shifted(large_lp, small_lp, by_row, evidence), FusionEvidence(evidence, by_row)


class DeferComposition(PositionwiseCollaboration):
    """The small expert decodes; tokens where its entropy exceeds `threshold` (nats) go to the large model."""

    Params = DeferParams

    def __init__(self, large: ExpertPool, small: ExpertPool, expert: str, name: str | None = None, **options):
        super().__init__(large, small, [expert], name or f"defer:{expert}", **options)
        self.deferred = self.decided = 0  # running counts: the fraction of tokens handed to the large model

    @property
    def deferred_fraction(self) -> float:
        return self.deferred / max(self.decided, 1)

    def stats(self) -> dict:
        return {"deferred_fraction": self.deferred_fraction, "tokens_decided": self.decided}

    def combine(self, large_lp, small_lp, real):
        expert = small_lp[0]
        entropy = torch.special.entr(expert.exp()).sum(-1)  # 0·log 0 = 0 on tokens a token map leaves out
        defer = entropy > self.params.threshold
        self.deferred += int((defer & real).sum())
        self.decided += int(real.sum())
        return torch.where(defer.unsqueeze(-1), large_lp, expert)


# --- the strategy registry: "<strategy>:<expert>" or "fusion" -> a Composition ---------------------------------


@dataclass(frozen=True)
class Strategy:
    """A registered collaboration: its factory, its parameter model (config.py), whether its spec names an expert."""

    name: str
    factory: Callable  # (large, small, expert | None, name=..., token_map=..., **params) -> Composition
    params: type[BaseModel]
    per_expert: bool


STRATEGIES: Registry[Strategy] = Registry("collaboration strategy")


def collaboration(name: str, params: type[BaseModel], per_expert: bool = True):
    """Decorator: `@collaboration("proxy", ProxyParams)` registers a strategy and the parameters it takes."""

    def wrap(factory):
        STRATEGIES.add(name, Strategy(name, factory, params, per_expert))
        return factory

    return wrap


def collaboration_strategies() -> dict[str, dict]:
    """{strategy name: its parameter defaults}."""
    return {name: s.params().model_dump() for name, s in STRATEGIES.items()}


def collaboration_names(experts: list[str]) -> list[str]:
    """Every spec small experts offer: `<strategy>:<expert>` per expert, plus expert-free ones (`fusion`)."""
    if not experts:
        return []
    names = []
    for name, s in STRATEGIES.items():
        names.extend(f"{name}:{e}" for e in experts) if s.per_expert else names.append(name)
    return names


def is_collaboration(name: str) -> bool:
    """Whether a composition name is a collaboration spec (`proxy:code`, `fusion`)."""
    return name.partition(":")[0] in STRATEGIES


def small_library(path: str | Path) -> Library:
    """The small model's expert library, from its project YAML or its library folder."""
    path = Path(path)
    library = Library(path) if path.is_dir() else Library(load_config(path).library)
    if not library.exists():
        raise ExpertkitError(f"{path} is not an expert library (no library.json); pass the small model's "
                             "project YAML or its library folder")
    return library


def load_small_pool(path: str | Path, device: str | None = None) -> ExpertPool:
    """The small model with its experts, from its project YAML or straight from its library folder."""
    library = small_library(path)
    adapters = [e.name for e in library.entries() if e.is_adapter]
    return ExpertPool(load_base(str(library.base_identity()["name"]), device), library, names=adapters)


def build_collaboration(spec: str, large: ExpertPool, small: ExpertPool,
                        token_map: TokenMap | TextAlignment | str | Path | None = None, **params) -> Composition:
    """`proxy:code`, `defer:code`, `card:code`, `fusion` ... -> a Composition of the large and the small model.

    `params` override the strategy's defaults (see `collaboration_strategies()`); None values are ignored,
    so a caller may pass every option it has.
    """
    strategy_name, _, expert = spec.partition(":")
    if strategy_name not in STRATEGIES:
        raise ExpertkitError(f"unknown collaboration strategy '{strategy_name}' in '{spec}'; choose one of "
                             f"{STRATEGIES.listing()} as '<strategy>:<expert>' (or 'fusion')")
    strategy = STRATEGIES[strategy_name]
    experts = small.adapter_names
    if strategy.per_expert and expert not in experts:
        what = f"unknown expert '{expert}'" if expert else "no expert"
        raise ExpertkitError(f"{what} in '{spec}'; the small model '{small.base.name}' has {experts}, "
                             f"so use one of {[f'{strategy_name}:{e}' for e in experts]}")
    if not strategy.per_expert and expert:
        raise ExpertkitError(f"'{strategy_name}' takes no expert (it uses every small expert); write "
                             f"'{strategy_name}', not '{spec}'")
    given = {k: v for k, v in params.items() if v is not None}
    checked_params(strategy.params, given, spec)
    return strategy.factory(large, small, expert or None, name=spec, token_map=token_map, **given)


@collaboration("proxy", ProxyParams)
def _proxy(large, small, expert, **options):
    return ProxyComposition(large, small, expert, **options)


@collaboration("fusion", FusionParams, per_expert=False)
def _fusion(large, small, expert, **options):
    return FusionComposition(large, small, small.adapter_names, **options)


@collaboration("defer", DeferParams)
def _defer(large, small, expert, **options):
    return DeferComposition(large, small, expert, **options)

