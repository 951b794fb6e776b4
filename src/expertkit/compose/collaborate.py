"""Collaborative decoding: a small domain expert steers a large general model at decoding time.

- proxy (proxy-tuning / emulated fine-tuning): log p ∝ large + α · (small_expert − small_base);
- fusion: several experts at once, log p ∝ large + α · Σ_k w_k (expert_k − small_base), with w the
  experts' posterior given the prefix (BTM's domain posterior), updated as tokens arrive;
- defer (FS-GEN / Co-LLM): the small expert answers, except where its predictive entropy exceeds a
  threshold; there the large model's distribution is used.

Each strategy is registered by name (`@collaboration("proxy", alpha=1.0)`) and built from a spec,
`build_collaboration("proxy:code", large, small)`; `collaboration_names(small)` lists the specs a
server offers.

The large model's weights are never touched. The small model's rows (expert and anti-expert) come
from ONE batched forward (PEFT per-row `adapter_names`), so its weights are held once and paid once
per step; both models keep KV caches. Each strategy returns log-probabilities, whose softmax is the
combined distribution, through the ordinary Composition interface.
"""

from __future__ import annotations

from abc import abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from expertkit.base import tokenizer_hash
from expertkit.compose.base import Composition, DecodeState
from expertkit.compose.mix import next_evidence, prefix_evidence
from expertkit.compose.lean import LeanDecoder, LeanState
from expertkit.compose.pool import BASE_ADAPTER, ExpertPool
from expertkit.compose.vocab import TokenMap, resolve_token_map
from expertkit.errors import ExpertkitError
from expertkit.registry import Registry

DEFER_THRESHOLD = 3.0  # nats: the small expert keeps a token while it is about as sure as a choice among ~20 tokens

def check_collaborators(large: ExpertPool, small: ExpertPool, experts: list[str],
                        token_map: TokenMap | str | Path | None = None) -> TokenMap | None:
    """Every expert loaded on the small base, and one vocabulary: the same one (-> None) or a token map."""
    missing = [e for e in experts if e not in small.adapter_names]
    if missing:
        raise ExpertkitError(f"expert(s) {missing} are not loaded on the small model '{small.base.name}' "
                             f"(loaded: {small.adapter_names}); use experts trained on that small base")
    if tokenizer_hash(large.tokenizer) == tokenizer_hash(small.tokenizer):
        return None
    if token_map is None:
        raise ExpertkitError(f"the large model '{large.base.name}' and the small model '{small.base.name}' have "
                             "different vocabularies, so their logits cannot be combined; build the small base "
                             "with base.build.tokenizer pointing at the large model, or supply a token mapping "
                             "(token_map='vocab' maps shared token strings, or a JSON file of large id -> small id)")
    return resolve_token_map(token_map, large, small)


class Collaboration(Composition):
    """The large model (bare) and the small model on `small_adapters`, one batched small forward per step.

    Options every strategy takes: `token_map` (when the vocabularies differ, see compose.vocab) and
    `fast_small` (decode steps of the small model with compose.lean; False keeps the HF/PEFT step).
    """

    def __init__(self, large: ExpertPool, small: ExpertPool, small_adapters: list[str], name: str,
                 token_map: TokenMap | str | Path | None = None, fast_small: bool = True):
        self.token_map = check_collaborators(large, small, [a for a in small_adapters if a != BASE_ADAPTER],
                                             token_map)
        self.large, self.small, self.small_adapters, self.name = large, small, small_adapters, name
        self.fast_small = fast_small  # decode steps of the small model with compose.lean (HF when unsupported)

    @abstractmethod
    def combine(self, large_lp: torch.Tensor, small_lp: torch.Tensor, extra: dict) -> torch.Tensor:
        """large_lp [B, ..., V], small_lp [k, B, ..., V] (one slice per small adapter) -> log-probs [B, ..., V]."""

    def _small_rows(self, rows: int) -> list[str]:
        return [a for a in self.small_adapters for _ in range(rows)]

    def _finish(self, large_logits, small_logits, rows: int, extra: dict):
        k = len(self.small_adapters)
        small_lp = torch.log_softmax(small_logits.float(), -1).view(k, rows, *small_logits.shape[1:])
        if self.token_map is not None:
            small_lp = self.token_map.to_large(small_lp)
        out = self.combine(torch.log_softmax(large_logits.float(), -1), small_lp.to(large_logits.device), extra)
        if self.token_map is not None:  # generate only tokens both models can read
            out = self.token_map.mask_unmapped(out)
        large_state = extra["large"]
        return out, DecodeState(None, large_state.attention_mask, large_state.next_position, extra)

    def prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor):
        rows, k = input_ids.shape[0], len(self.small_adapters)
        large_logits, large_state = self.large.prefill(input_ids, attention_mask, [BASE_ADAPTER] * rows)
        small_ids = self.token_map.to_small(input_ids) if self.token_map is not None else input_ids
        small_logits, small_state = self.small.prefill(small_ids.repeat(k, 1), attention_mask.repeat(k, 1),
                                                        self._small_rows(rows))
        extra = {"large": large_state, "small": small_state, "mask": attention_mask.to(large_logits.device).bool(),
                 "input_ids": input_ids}
        return self._finish(large_logits, small_logits, rows, extra)

    def step(self, state: DecodeState, next_ids: torch.Tensor):
        rows, k = next_ids.shape[0], len(self.small_adapters)
        extra = {**state.extra, "next_ids": next_ids}
        extra.pop("input_ids", None)
        large_logits, extra["large"] = self.large.step(extra["large"], next_ids, [BASE_ADAPTER] * rows)
        small_ids = self.token_map.to_small(next_ids) if self.token_map is not None else next_ids
        small_logits, extra["small"] = self._small_step(extra["small"], small_ids.repeat(k), rows)
        if extra["mask"].dim() > 1:  # after prefill every row is real
            extra["mask"] = torch.ones(rows, dtype=torch.bool, device=large_logits.device)
        return self._finish(large_logits, small_logits, rows, extra)

    def _small_step(self, state, ids: torch.Tensor, rows: int):
        """One small step: on the first one, move the HF prefill cache into the lean decoder when it applies."""
        if isinstance(state, DecodeState) and self.fast_small:
            lean = LeanDecoder.build(self.small.base.model, self.small_adapters)
            if lean is not None:
                state = lean.start(state.past, state.attention_mask, state.next_position, self._small_rows(rows))
        if isinstance(state, LeanState):
            return state.decoder.step(state, ids)
        return self.small.step(state, ids, self._small_rows(rows))


class ProxyComposition(Collaboration):
    """Proxy-tuning: the large model shifted by α times what tuning changed in the small model."""

    def __init__(self, large: ExpertPool, small: ExpertPool, expert: str, alpha: float = 1.0,
                 name: str | None = None, **options):
        if alpha < 0:
            raise ExpertkitError(f"proxy alpha must be >= 0 (0 = the large model alone), got {alpha}")
        super().__init__(large, small, [expert, BASE_ADAPTER], name or f"proxy:{expert}", **options)
        self.alpha = alpha

    def combine(self, large_lp, small_lp, extra):
        expert, anti_expert = small_lp[0], small_lp[1]
        return large_lp + self.alpha * (expert - anti_expert)


class FusionComposition(Collaboration):
    """Several small experts steer the large model, each weighted by its posterior given the prefix."""

    def __init__(self, large: ExpertPool, small: ExpertPool, experts: list[str], alpha: float = 1.0,
                 name: str = "fusion", **options):
        if alpha < 0:
            raise ExpertkitError(f"fusion alpha must be >= 0 (0 = the large model alone), got {alpha}")
        if not experts:
            raise ExpertkitError("fusion needs at least one expert")
        super().__init__(large, small, [*experts, BASE_ADAPTER], name, **options)
        self.alpha = alpha
        self.log_prior = torch.full((len(experts),), -torch.log(torch.tensor(float(len(experts)))).item())

    def combine(self, large_lp, small_lp, extra):
        experts, anti_expert = small_lp[:-1], small_lp[-1]  # [K, B, ..., V], [B, ..., V]
        by_row = experts.transpose(0, 1)  # [B, K, ..., V]
        if self.token_map is not None:  # a token no expert can express is no evidence for any of them
            by_row = by_row.masked_fill(by_row == float("-inf"), 0.0)
        if "next_ids" in extra:  # one step: update the running evidence with the token just chosen
            evidence = next_evidence(extra["evidence"], extra["last_log_probs"], extra["next_ids"])
            extra["evidence"] = evidence
        else:
            evidence = prefix_evidence(by_row, extra["input_ids"], extra["mask"].long(), self.log_prior)
            extra["evidence"] = evidence[:, :, -1]
        extra["last_log_probs"] = by_row if by_row.dim() == 3 else by_row[:, :, -1]
        weights = torch.softmax(evidence, dim=1)  # [B, K, ...]
        shift = (weights.unsqueeze(-1) * (by_row - anti_expert.unsqueeze(1))).sum(1)
        return large_lp + self.alpha * shift


class DeferComposition(Collaboration):
    """The small expert decodes; tokens where its entropy exceeds `threshold` (nats) go to the large model."""

    def __init__(self, large: ExpertPool, small: ExpertPool, expert: str, threshold: float = DEFER_THRESHOLD,
                 name: str | None = None, **options):
        if threshold < 0:
            raise ExpertkitError(f"defer threshold is an entropy in nats and must be >= 0, got {threshold}")
        super().__init__(large, small, [expert], name or f"defer:{expert}", **options)
        self.threshold = threshold
        self.deferred = self.decided = 0  # running counts: the fraction of tokens handed to the large model

    @property
    def deferred_fraction(self) -> float:
        return self.deferred / max(self.decided, 1)

    def stats(self) -> dict:
        return {"deferred_fraction": self.deferred_fraction, "tokens_decided": self.decided}

    def combine(self, large_lp, small_lp, extra):
        expert = small_lp[0]
        entropy = torch.special.entr(expert.exp()).sum(-1)  # 0·log 0 = 0 on tokens a token map leaves out
        defer = entropy > self.threshold
        real = extra["mask"]
        self.deferred += int((defer & real).sum())
        self.decided += int(real.sum())
        return torch.where(defer.unsqueeze(-1), large_lp, expert)


# --- the strategy registry: "<strategy>:<expert>" or "fusion" -> a Composition ---------------------------------


@dataclass(frozen=True)
class Strategy:
    """A registered collaboration: its factory, whether its spec names one expert, and its parameter defaults."""

    name: str
    factory: Callable  # (large, small, expert | None, **params) -> Composition
    per_expert: bool
    defaults: dict


STRATEGIES: Registry[Strategy] = Registry("collaboration strategy")


def collaboration(name: str, per_expert: bool = True, **defaults):
    """Decorator: `@collaboration("proxy", alpha=1.0)` registers a strategy and the parameters it accepts."""

    def wrap(factory):
        STRATEGIES.add(name, Strategy(name, factory, per_expert, defaults))
        return factory

    return wrap


def collaboration_strategies() -> dict[str, dict]:
    """{strategy name: its parameter defaults}."""
    return {name: dict(s.defaults) for name, s in STRATEGIES.items()}


def small_experts(small: ExpertPool) -> list[str]:
    """The adapters of the small pool that can steer (experts and LoRA merges)."""
    return list(small.adapter_names)


def collaboration_names(small: ExpertPool) -> list[str]:
    """Every spec a server should list: `<strategy>:<expert>` per small expert, plus expert-free ones (`fusion`)."""
    experts = small_experts(small)
    if not experts:
        return []
    names = []
    for name, s in STRATEGIES.items():
        names.extend(f"{name}:{e}" for e in experts) if s.per_expert else names.append(name)
    return names


def load_small_pool(path: str | Path, device: str | None = None) -> ExpertPool:
    """The small model with its experts, from its project YAML or straight from its library folder."""
    from expertkit.base import load_base
    from expertkit.config import load_config
    from expertkit.library import Library

    path = Path(path)
    if path.is_dir():
        library = Library(path)
        if not library.exists():
            raise ExpertkitError(f"{path} is not an expert library (no library.json); pass the small model's "
                                 "project YAML or its library folder")
        base_path = library.base_identity()["name"]
    else:
        cfg = load_config(path)
        library, base_path = Library(cfg.library), cfg.base.path
    adapters = [e.name for e in library.entries() if e.is_adapter]
    return ExpertPool(load_base(str(base_path), device), library, names=adapters)


def build_collaboration(spec: str, large: ExpertPool, small: ExpertPool, **params) -> Composition:
    """`proxy:code`, `defer:code`, `card:code`, `fusion` ... -> a Composition of the large and the small model.

    `params` override the strategy's defaults (see `collaboration_strategies()`); None values are ignored,
    so a caller may pass every option it has.
    """
    strategy_name, _, expert = spec.partition(":")
    if strategy_name not in STRATEGIES:
        raise ExpertkitError(f"unknown collaboration strategy '{strategy_name}' in '{spec}'; choose one of "
                             f"{STRATEGIES.listing()} as '<strategy>:<expert>' (or 'fusion')")
    strategy = STRATEGIES[strategy_name]
    experts = small_experts(small)
    if strategy.per_expert and expert not in experts:
        what = f"unknown expert '{expert}'" if expert else "no expert"
        raise ExpertkitError(f"{what} in '{spec}'; the small model '{small.base.name}' has {experts}, "
                             f"so use one of {[f'{strategy_name}:{e}' for e in experts]}")
    if not strategy.per_expert and expert:
        raise ExpertkitError(f"'{strategy_name}' takes no expert (it uses every small expert); write "
                             f"'{strategy_name}', not '{spec}'")
    given = {k: v for k, v in params.items() if v is not None}
    unknown = sorted(set(given) - set(strategy.defaults))
    if unknown:
        raise ExpertkitError(f"strategy '{strategy_name}' takes no parameter(s) {unknown}; it takes "
                             f"{sorted(strategy.defaults) or 'none'}")
    return strategy.factory(large, small, expert or None, name=spec, **{**strategy.defaults, **given})


@collaboration("proxy", alpha=1.0, token_map=None)
def _proxy(large, small, expert, name, alpha, token_map):
    return ProxyComposition(large, small, expert, alpha=alpha, name=name, token_map=token_map)


@collaboration("fusion", per_expert=False, alpha=1.0, token_map=None)
def _fusion(large, small, expert, name, alpha, token_map):
    return FusionComposition(large, small, small_experts(small), alpha=alpha, name=name, token_map=token_map)


@collaboration("defer", threshold=DEFER_THRESHOLD, token_map=None)
def _defer(large, small, expert, name, threshold, token_map):
    return DeferComposition(large, small, expert, threshold=threshold, name=name, token_map=token_map)


from expertkit.compose import card as _card  # noqa: E402,F401  (registers "card"; it builds on this module)
