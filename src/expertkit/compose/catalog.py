"""Everything a pool can answer with, by name: the base, each library entry, and each collaboration.

The scorecard, the task evaluation, the generator and the server all build their compositions here,
so a collaboration (`proxy:code`, `fusion` ... given a pool of small experts) is scored and served
like any library entry.
"""

from __future__ import annotations

from expertkit.compose.adapters import is_mix, mix_composition
from expertkit.compose.base import COMPOSITIONS
from expertkit.compose.collaborate import build_collaboration, collaboration_names, is_collaboration
from expertkit.errors import ExpertkitError
from expertkit.library import BASE
from expertkit.runtime import Composition, ExpertPool


def build_compositions(pool: ExpertPool, names: list[str] | None = None, small: ExpertPool | None = None,
                       token_map: str | None = None) -> list[Composition]:
    """The base, one composition per library entry and, with `small`, every collaboration it offers.

    With `names`, just those, in that order (a collaboration spec needs `small`; `mix:a=0.7,b=0.3` is a
    weighted mix of the pool's adapters). `token_map`: how collaborations align two vocabularies.
    """
    by_name = {BASE: COMPOSITIONS[BASE](pool, None)}
    for entry in list(pool.entries):  # a factory may attach the entries it needs (see ExpertPool.ensure)
        if entry.kind not in COMPOSITIONS:
            raise ExpertkitError(f"library entry '{entry.name}' has kind '{entry.kind}' that no composition handles; "
                                 f"known kinds: {COMPOSITIONS.listing()}")
        by_name[entry.name] = COMPOSITIONS[entry.kind](pool, entry)
    offered = collaboration_names(small.adapter_names) if small is not None else []
    wanted = [*by_name, *offered] if names is None else names
    if small is None:
        require_small([n for n in wanted if n not in by_name])
    missing = [n for n in wanted if n not in by_name and not is_collaboration(n) and not is_mix(n)]
    if missing:
        raise ExpertkitError(f"unknown composition(s) {missing}; available: {sorted(by_name)}"
                             + (f" and {offered}" if offered else "") + " and mixes mix:EXPERT=WEIGHT,...")

    def build(name: str) -> Composition:
        if name in by_name:
            return by_name[name]
        if is_mix(name):
            return mix_composition(pool, name)
        return build_collaboration(name, pool, small, token_map=token_map)

    return [build(n) for n in wanted]


def require_small(names: list[str]) -> None:
    """Refuse collaboration specs among `names` when no small model was given (before any model is loaded)."""
    needs_small = [n for n in names if is_collaboration(n)]
    if needs_small:
        raise ExpertkitError(f"{needs_small} are collaborations: they need a small model with experts (--small PATH)")
