"""The simplest compositions: the bare base, one library adapter (an expert or a merge), and a weighted
mix of adapters named `mix:a=0.7,b=0.3` (each row gets exactly sum_k w_k ΔW_k; nothing merged on disk)."""

from __future__ import annotations

import math

import torch

from expertkit.compose.base import register
from expertkit.errors import ExpertkitError
from expertkit.library import BASE, Kind
from expertkit.runtime import BASE_ADAPTER, AdapterMix, Composition, ExpertPool, PoolState

MIX_PREFIX = "mix:"


class AdapterComposition(Composition):
    """Every row answered by one adapter of the pool (BASE_ADAPTER = the base itself), or one AdapterMix."""

    def __init__(self, pool: ExpertPool, adapter: str | AdapterMix, name: str):
        self.pool, self.adapter, self.name = pool, adapter, name

    def prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, keep_last: int | None = None):
        return self.pool.prefill(input_ids, attention_mask, [self.adapter] * input_ids.shape[0], keep_last=keep_last)

    def step(self, state: PoolState, next_ids: torch.Tensor):
        return self.pool.step(state, next_ids)

    def pool_rows(self, pool) -> str | AdapterMix | None:
        return self.adapter if pool is self.pool else None


@register(BASE)
def base_composition(pool: ExpertPool, entry) -> Composition:
    return AdapterComposition(pool, BASE_ADAPTER, BASE)


@register(Kind.EXPERT)
@register(Kind.MERGE)
def adapter_composition(pool: ExpertPool, entry) -> Composition:
    return AdapterComposition(pool, entry.name, entry.name)


def single_adapters(compositions: dict[str, Composition]) -> list[str]:
    """The names among `compositions` that answer with one library adapter (what a mix may combine)."""
    return [name for name, c in compositions.items()
            if isinstance(c, AdapterComposition) and isinstance(c.adapter, str) and c.adapter != BASE_ADAPTER]


def is_mix(name: str) -> bool:
    return name.startswith(MIX_PREFIX)


def parse_mix(spec: str, adapters: list[str]) -> AdapterMix:
    """`mix:a=0.7,b=0.3` as an AdapterMix of `adapters`; one clear error for any other spelling."""
    form = f"the form is {MIX_PREFIX}EXPERT=WEIGHT,EXPERT=WEIGHT"
    body = spec[len(MIX_PREFIX):] if is_mix(spec) else spec
    weights: dict[str, float] = {}
    for part in filter(None, (p.strip() for p in body.split(","))):
        name, sep, value = part.partition("=")
        name = name.strip()
        try:
            weight = float(value) if sep else math.nan
        except ValueError:
            weight = math.nan
        if not sep or not math.isfinite(weight) or weight < 0:
            raise ExpertkitError(f"'{spec}': the weight of '{name}' must be a finite number >= 0 ({form})")
        if name in weights:
            raise ExpertkitError(f"'{spec}' names '{name}' twice; give each expert once")
        weights[name] = weight
    if not weights:
        raise ExpertkitError(f"'{spec}' mixes nothing; {form}")
    unknown = sorted(set(weights) - set(adapters))
    if unknown:
        raise ExpertkitError(f"'{spec}' names {unknown}, which are not adapters served here; available: {adapters}")
    if not any(weights.values()):
        raise ExpertkitError(f"'{spec}': every weight is 0; give at least one expert a positive weight")
    return AdapterMix(tuple(weights.items()))


def mix_composition(pool: ExpertPool, spec: str, adapters: list[str] | None = None) -> AdapterComposition:
    """The composition of a weighted mix over the pool's adapters (or just `adapters`, those a server serves)."""
    mix = parse_mix(spec, pool.adapter_names if adapters is None else adapters)
    return AdapterComposition(pool, mix, str(mix))
