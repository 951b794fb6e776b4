"""A token mapping between a large and a small model whose vocabularies differ.

Logit arithmetic needs both models to score the same next token and to read the same token
sequence, so the mapping is token-to-token (large id -> small id):
- built from the two vocabularies (`"vocab"`): tokens with the same string (byte-level BPE pieces,
  e.g. "Ġdose") map to each other; special tokens map by role (EOS, BOS, PAD) even if spelled
  differently;
- or read from a JSON file {"<large id>": <small id>, ...} for pairs that a string match misses.

How it is used: the small model reads the prompt through `to_small` (a large token without a small
counterpart becomes the small model's UNK or EOS: it sees a wrong token there, the only lossy step);
its log-probabilities are spread onto the large vocabulary by `to_large`, where tokens it cannot
express get -inf, and a collaboration masks those tokens in the combined distribution too. So every
token a collaboration generates exists in both vocabularies, and during generation the small model
always reads exactly what was chosen. (Perplexity counts a test token outside the map as impossible.)
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from expertkit.errors import ExpertkitError


def _model_vocab(pool) -> int:
    """Rows of the model's output layer (may exceed the tokenizer's size when the embedding is padded)."""
    return int(pool.base.model.config.vocab_size)


class TokenMap:
    """large id -> small id (-1: no counterpart), for a large and a small model."""

    def __init__(self, large_to_small: torch.Tensor, small_fallback: int, source: str):
        self.large_to_small = large_to_small.long()
        self.mapped = self.large_to_small >= 0
        self.index = self.large_to_small.clamp(min=0)
        self.small_fallback = small_fallback
        self.source = source
        if not bool(self.mapped.any()):
            raise ExpertkitError(f"token map ({source}) maps no token of the large vocabulary to the small one; "
                                 "the two models share nothing to combine")

    @property
    def coverage(self) -> float:
        """Share of the large vocabulary the small model can express."""
        return float(self.mapped.float().mean())

    def to_small(self, ids: torch.Tensor) -> torch.Tensor:
        """Large-vocabulary ids -> small-vocabulary ids (unmapped: the small model's UNK/EOS)."""
        mapped = self.large_to_small.to(ids.device)[ids]
        return torch.where(mapped >= 0, mapped, torch.full_like(mapped, self.small_fallback))

    def to_large(self, small_scores: torch.Tensor) -> torch.Tensor:
        """[..., V_small] -> [..., V_large]; large tokens without a counterpart get -inf."""
        out = small_scores.index_select(-1, self.index.to(small_scores.device))
        return out.masked_fill(~self.mapped.to(small_scores.device), float("-inf"))

    def mask_unmapped(self, scores: torch.Tensor) -> torch.Tensor:
        """-inf on large tokens the small model cannot express (the combined distribution's support)."""
        return scores.masked_fill(~self.mapped.to(scores.device), float("-inf"))

    # -- construction ---------------------------------------------------------------------------------

    @classmethod
    def from_tokenizers(cls, large, small) -> "TokenMap":
        """Same string -> same token; special tokens by role."""
        small_vocab = small.tokenizer.get_vocab()
        table = torch.full((_model_vocab(large),), -1, dtype=torch.long)
        for piece, large_id in large.tokenizer.get_vocab().items():
            if piece in small_vocab and large_id < len(table) and small_vocab[piece] < _model_vocab(small):
                table[large_id] = small_vocab[piece]
        for role in ("eos_token_id", "bos_token_id", "pad_token_id"):
            lid, sid = getattr(large.tokenizer, role), getattr(small.tokenizer, role)
            if lid is not None and sid is not None and lid < len(table):
                table[lid] = sid
        return cls(table, _fallback(small), "shared token strings")

    @classmethod
    def from_json(cls, path: str | Path, large, small) -> "TokenMap":
        """{"<large id>": <small id>} from a JSON file; ids are checked against both models."""
        path = Path(path)
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
            pairs = {int(k): int(v) for k, v in raw.items()}
        except FileNotFoundError:
            raise ExpertkitError(f"token map file not found: {path}") from None
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError, TypeError, ValueError) as e:
            raise ExpertkitError(f"token map {path} must be a JSON object {{\"<large id>\": <small id>}} ({e})") \
                from None
        n_large, n_small = _model_vocab(large), _model_vocab(small)
        bad = [(k, v) for k, v in pairs.items() if not (0 <= k < n_large and 0 <= v < n_small)]
        if bad:
            raise ExpertkitError(f"token map {path}: pair {bad[0][0]} -> {bad[0][1]} is outside the vocabularies "
                                 f"(large has {n_large} ids, small {n_small}); fix the file")
        table = torch.full((n_large,), -1, dtype=torch.long)
        for k, v in pairs.items():
            table[k] = v
        return cls(table, _fallback(small), str(path))


def _fallback(small) -> int:
    tok = small.tokenizer
    for candidate in (tok.unk_token_id, tok.eos_token_id, 0):
        if candidate is not None:
            return int(candidate)
    return 0


def resolve_token_map(token_map, large, small) -> TokenMap | None:
    """None, "vocab", a JSON path or a TokenMap -> a TokenMap (or None)."""
    if token_map is None or isinstance(token_map, TokenMap):
        return token_map
    if token_map == "vocab":
        return TokenMap.from_tokenizers(large, small)
    if isinstance(token_map, (str, Path)):
        return TokenMap.from_json(token_map, large, small)
    raise ExpertkitError(f"token_map must be 'vocab', a JSON file path or a TokenMap, got {type(token_map).__name__}")
