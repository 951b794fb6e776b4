"""Logits of a few rows through a vocabulary-sized head, computed the way CPUs do it fast.

Why: a decode step multiplies a handful of hidden rows by the head, a tall [vocab, hidden] matrix that does not
fit in cache. On CPU, `F.linear(x, W)` (x · Wᵀ) with so few rows runs several times slower than the same product
written W · xᵀ (the x · Wᵀ form takes a slower kernel path here). Measured on 2 CPU cores (torch 2.13,
SmolLM2's 49,152 x 288 and x 576 heads, fp32): 2 rows 13-24 ms vs 1.5-3.5 ms; 1 row 6-12 ms vs 2.6-6 ms
once padded to two. From about a dozen rows on the plain form is as fast or faster, so it is kept there, and
on every other device.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

FEW_ROWS = 8  # up to this many rows, W · xᵀ wins on CPU (measured; see the module docstring)


def vocab_logits(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [R, D] @ weight[V, D]ᵀ (+ bias) -> [R, V]: the same product as F.linear, fast for a few rows on CPU."""
    rows = x.shape[0]
    if x.device.type != "cpu" or x.dim() != 2 or rows > FEW_ROWS:
        return F.linear(x, weight, bias)
    columns = x if rows > 1 else torch.cat((x, x))  # one column runs as the slow matrix-vector product
    out = torch.mm(weight, columns.t()).t()[:rows]
    return out if bias is None else out + bias


class VocabHead(torch.nn.Linear):
    """A model's output layer that takes `vocab_logits` for a few rows: the transformers decode step of a real
    model then pays W · xᵀ for its head (Gemma-3's 262,144 x 640 head at 1 row: 55 -> 20 ms on 2 cores; SmolLM2's
    49,152 x 576: 10 -> 3 ms, at 2 rows 21 -> 3 ms). Prefill and training (many rows) keep F.linear."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[..., D] -> [..., V]; vocab_logits decides by the number of rows and the device which form to take."""
        return vocab_logits(x.reshape(-1, x.shape[-1]), self.weight, self.bias).view(*x.shape[:-1], -1)


def use_vocab_head(model: torch.nn.Module) -> bool:
    """Give `model`'s output layer VocabHead's forward (the same module, weights and ties; only its class changes,
    so copies and saves are unaffected). A head that is not a plain Linear (a LoRA layer, say) is left as it is."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if type(head) is torch.nn.Linear:
        head.__class__ = VocabHead
    return isinstance(head, VocabHead)
