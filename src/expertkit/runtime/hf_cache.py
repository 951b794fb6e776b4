"""Where a transformers model takes and returns its KV cache.

transformers 5.25 names it `cache` (argument and output field) and keeps `past_key_values` only as a
deprecated alias, removed in 5.40; the releases before the rename, down to the lowest we support, know only
`past_key_values`. Every cache the runtime hands a model goes through here, so neither kind of release breaks.
"""

from __future__ import annotations

import inspect
from functools import lru_cache

OLD_NAME, NEW_NAME = "past_key_values", "cache"


def cache_keyword(model) -> str:
    """The forward keyword for the KV cache of `model` (a transformers model, or a PeftModel around one)."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    return _keyword_of(type(inner))


@lru_cache(maxsize=None)
def _keyword_of(model_class: type) -> str:
    return NEW_NAME if NEW_NAME in inspect.signature(model_class.forward).parameters else OLD_NAME


def returned_cache(output):
    """The KV cache a forward returned, under whichever field its output class declares."""
    fields = getattr(output, "__dataclass_fields__", {})
    return getattr(output, NEW_NAME) if NEW_NAME in fields else getattr(output, OLD_NAME)
