"""A low-overhead decode step for the small model of a collaboration (Llama family, plain LoRA).

Why by hand: a collaboration pays the small model once per generated token, and at the sizes where a
small model steers a large one on CPU a Hugging Face decode step is mostly per-op Python overhead: the
cache object concatenates every layer's keys, the causal mask is rebuilt, and mixed expert/base rows go
through per-layer hooks (the pool's RowLoRA) or PEFT's `adapter_names` regrouping. The step here
is the same math as transformers' LlamaDecoderLayer (RMSNorm, rotary, SDPA with grouped KV heads,
SiLU MLP) with:
- KV buffers preallocated and written in place (grown by doubling), masks only when rows are padded;
- rotate_half as one matmul with a fixed signed permutation, applied to q and k together;
- the vocabulary head as W · xᵀ on CPU (runtime.vocab_head: several times faster for a few rows);
- LoRA deltas for contiguous row groups only (rows [expert..., base...]): h[g] @ A^T then one in-place
  addmm into the projection's output; base rows pay nothing. Weights stay where they are: the base
  weights are the model's own tensors (held once); only the small LoRA factors are re-laid out.
Prefill stays the HF forward (exact, padded batches, any length); its cache is copied into the
buffers. Anything not covered (another architecture, DoRA, merged adapters, dynamic rope, sliding
windows) makes `LeanDecoder.build` return None and the caller keeps the HF path.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from expertkit.runtime.state import BASE_ADAPTER
from expertkit.runtime.vocab_head import vocab_logits

log = logging.getLogger("expertkit.runtime")
_SAID: set[int] = set()  # models whose fallback was already logged

PROJECTIONS = (("self_attn", "q_proj"), ("self_attn", "k_proj"), ("self_attn", "v_proj"), ("self_attn", "o_proj"),
               ("mlp", "gate_proj"), ("mlp", "up_proj"), ("mlp", "down_proj"))


def unsupported(model) -> str | None:
    """Why the lean step cannot run this model (None: it can)."""
    cfg = model.config
    if cfg.model_type != "llama":
        return f"architecture {cfg.model_type}"
    if cfg.hidden_act != "silu" or getattr(cfg, "pretraining_tp", 1) != 1:
        return "activation / tensor-parallel layout"
    rope = getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None) or {}
    if "dynamic" in str(rope.get("rope_type", "default")):
        return "dynamic rope"
    if not hasattr(model.model, "rotary_emb"):
        return "no rotary module"
    return None


def _linear_parts(module, adapters: list[str]):
    """(base weight, base bias, {adapter: (A^T, (scaling·B)^T)}) of a Linear that may be a PEFT LoRA layer."""
    if not hasattr(module, "base_layer"):
        return module.weight, module.bias, {}
    if module.merged:
        raise _Unsupported("merged adapter")
    loras = {}
    for name in adapters:
        if name not in module.lora_A:
            continue
        if name in getattr(module, "lora_variant", {}) or module.lora_B[name].bias is not None:
            raise _Unsupported("LoRA variant (DoRA / lora_bias)")
        a, b = module.lora_A[name].weight, module.lora_B[name].weight
        loras[name] = (a.t().contiguous(), (b * module.scaling[name]).t().contiguous())
    return module.base_layer.weight, module.base_layer.bias, loras


class _Unsupported(Exception):
    """A layer the lean step does not cover; `LeanDecoder.build` turns it into None (use the HF step)."""


@dataclass
class LeanState:
    """Preallocated KV buffers [R, kv_heads, capacity, head_dim] per layer, filled up to `length`."""

    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    length: int
    positions: torch.Tensor  # [R] position of the next token of each row
    mask: torch.Tensor | None  # [R, 1, 1, capacity] True = attend; None when no row is padded
    groups: list[tuple[str, slice]]  # contiguous row groups that use an adapter
    decoder: "LeanDecoder"


class LeanDecoder:
    """Decode steps of one Llama model with the given LoRA adapters available per row group."""

    def __init__(self, model, adapters: list[str]):
        cfg = model.config
        self.heads, self.kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.eps, self.scale = cfg.rms_norm_eps, self.head_dim ** -0.5
        inner = model.model
        self.embed, self.final_norm, self.lm_head = inner.embed_tokens.weight, inner.norm.weight, model.lm_head
        self.inv_freq = inner.rotary_emb.inv_freq.float()
        self.rope_scale = float(inner.rotary_emb.attention_scaling)
        half = self.head_dim // 2
        rot = torch.zeros(self.head_dim, self.head_dim)  # x @ rot == cat(-x[half:], x[:half])
        rot[torch.arange(half, self.head_dim), torch.arange(half)] = -1.0
        rot[torch.arange(half), torch.arange(half, self.head_dim)] = 1.0
        self.rot = rot.to(self.embed.device, self.embed.dtype)
        self.layers = []
        for layer in inner.layers:
            parts = {proj: _linear_parts(getattr(getattr(layer, block), proj), adapters) for block, proj in PROJECTIONS}
            self.layers.append((layer.input_layernorm.weight, layer.post_attention_layernorm.weight, parts))
        self.lm_head_parts = _linear_parts(self.lm_head, adapters)

    @classmethod
    def build(cls, model, adapters: list[str]) -> "LeanDecoder | None":
        """The lean step for this model, or None (said once per model in the log: the caller keeps the HF step)."""
        reason = unsupported(model)
        if reason is None:
            try:
                return cls(model, [a for a in adapters if a != BASE_ADAPTER])
            except _Unsupported as e:
                reason = str(e) or "a LoRA variant"
        if id(model) not in _SAID:
            _SAID.add(id(model))
            log.info("lean decode step not used for %s (%s): the transformers step decodes it", type(model).__name__,
                     reason)
        return None

    # -- state ----------------------------------------------------------------------------------------

    def start(self, past, attention_mask: torch.Tensor, next_position: torch.Tensor, row_adapters: list[str],
              room: int = 128) -> LeanState:
        """Copy an HF prefill cache into buffers with `room` free slots; rows grouped by adapter."""
        keys, values = [], []
        for layer in past.layers:
            k, v = layer.keys, layer.values
            rows, heads, length, dim = k.shape
            kb, vb = k.new_empty(rows, heads, length + room, dim), v.new_empty(rows, heads, length + room, dim)
            kb[:, :, :length], vb[:, :, :length] = k, v
            keys.append(kb), values.append(vb)
        mask = None
        if not bool(attention_mask.all()):
            mask = torch.ones(attention_mask.shape[0], 1, 1, length + room, dtype=torch.bool, device=k.device)
            mask[:, 0, 0, :length] = attention_mask.bool().to(k.device)
        return LeanState(keys, values, length, next_position.clone(), mask, _groups(row_adapters), self)

    @staticmethod
    def _grow(state: LeanState) -> None:
        """Double the buffers' capacity (copying what is filled)."""
        state.keys = [_widen(k, 2) for k in state.keys]
        state.values = [_widen(v, 2) for v in state.values]
        if state.mask is not None:
            state.mask = _widen(state.mask, 3, fill=True)

    # -- one step -------------------------------------------------------------------------------------

    def _project(self, x: torch.Tensor, parts, groups, linear=F.linear) -> torch.Tensor:
        weight, bias, loras = parts
        y = linear(x, weight, bias)
        for adapter, rows in groups:
            if adapter in loras:
                a_t, b_t = loras[adapter]
                y[rows].addmm_(x[rows].mm(a_t), b_t)
        return y

    @torch.no_grad()
    def step(self, state: LeanState, ids: torch.Tensor) -> tuple[torch.Tensor, LeanState]:
        """Logits [R, V] for one new token per row; the buffers are extended in place."""
        if state.length == state.keys[0].shape[2]:
            self._grow(state)
        at, groups, rows = state.length, state.groups, ids.shape[0]
        x = F.embedding(ids.view(-1).to(self.embed.device), self.embed)
        freqs = state.positions.to(x.device)[:, None].float() * self.inv_freq
        angles = torch.cat((freqs, freqs), -1)[:, None]  # [R, 1, head_dim]
        cos, sin = (angles.cos() * self.rope_scale).to(x.dtype), (angles.sin() * self.rope_scale).to(x.dtype)
        mask = state.mask[..., : at + 1] if state.mask is not None else None
        width = x.shape[-1]
        for (norm_in, norm_post, parts), kb, vb in zip(self.layers, state.keys, state.values):
            h = F.rms_norm(x, (width,), norm_in, self.eps)
            q, k = self._project(h, parts["q_proj"], groups), self._project(h, parts["k_proj"], groups)
            v = self._project(h, parts["v_proj"], groups)
            qk = torch.cat((q, k), -1).view(rows, self.heads + self.kv_heads, self.head_dim)
            qk = qk * cos + (qk @ self.rot) * sin
            kb[:, :, at] = qk[:, self.heads:]
            vb[:, :, at] = v.view(rows, self.kv_heads, self.head_dim)
            attn = F.scaled_dot_product_attention(qk[:, : self.heads, None], kb[:, :, : at + 1], vb[:, :, : at + 1],
                                                  attn_mask=mask, scale=self.scale,
                                                  enable_gqa=self.heads != self.kv_heads)
            x = x + self._project(attn.view(rows, -1), parts["o_proj"], groups)
            h = F.rms_norm(x, (width,), norm_post, self.eps)
            gate, up = self._project(h, parts["gate_proj"], groups), self._project(h, parts["up_proj"], groups)
            x = x + self._project(F.silu(gate) * up, parts["down_proj"], groups)
        logits = self._project(F.rms_norm(x, (width,), self.final_norm, self.eps), self.lm_head_parts, groups,
                               vocab_logits)
        state.length, state.positions = at + 1, state.positions + 1
        return logits, state


def _widen(t: torch.Tensor, dim: int, fill=None) -> torch.Tensor:
    """t with dimension `dim` twice as long; the old part copied, the new part `fill` (or uninitialised)."""
    shape = list(t.shape)
    shape[dim] *= 2
    out = t.new_empty(shape) if fill is None else t.new_full(shape, fill)
    out.narrow(dim, 0, t.shape[dim]).copy_(t)
    return out


def _groups(row_adapters: list[str]) -> list[tuple[str, slice]]:
    """Runs of the same adapter -> (adapter, row slice); the bare base needs no group."""
    groups, start = [], 0
    for i in range(1, len(row_adapters) + 1):
        if i == len(row_adapters) or row_adapters[i] != row_adapters[start]:
            if row_adapters[start] != BASE_ADAPTER:
                groups.append((row_adapters[start], slice(start, i)))
            start = i
    return groups
