"""The model runtime: the layer below every composition, router and server.

It owns the base model with its attached adapters (pool.py, with the fast forward paths row_lora.py and
lean.py), the composition interface and decode state every strategy implements (composition.py,
state.py), and what is written once for all of them: padding (tokens.py), per-token log-likelihood
(logprobs.py), sampling (sampling.py), stop strings (text.py), the KV-cache row edits of continuous
batching (kvcache.py) and the one generation loop (decoding.py).
"""

from expertkit.runtime.composition import Composition
from expertkit.runtime.decoding import Sequence, generate, generate_ids
from expertkit.runtime.pool import ExpertPool
from expertkit.runtime.sampling import SamplingParams
from expertkit.runtime.state import BASE_ADAPTER, AdapterMix, DecodeState, PoolState, RowAdapter

__all__ = ["BASE_ADAPTER", "AdapterMix", "Composition", "DecodeState", "ExpertPool", "PoolState", "RowAdapter",
           "SamplingParams", "Sequence", "generate", "generate_ids"]
