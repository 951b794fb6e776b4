"""Aligning a large and a small model whose vocabularies differ.

Two ways, chosen by `token_map`:
- `"text"` (the default; `TextAlignment`): the small model reads the large model's TEXT in its own tokens
  and is asked about each large candidate token as text. It needs no shared token strings, so it works
  between any two tokenizers that can spell each other's text (SmolLM2's byte-level BPE and Gemma's
  SentencePiece, say). See the class for how.
- a token-to-token map (`TokenMap`, large id -> small id), exact where it applies:
  - built from the two vocabularies (`"vocab"`): tokens with the same string (byte-level BPE pieces,
    e.g. "Ġdose") map to each other; special tokens map by role (EOS, BOS, PAD) even if spelled
    differently;
  - or read from a JSON file {"<large id>": <small id>, ...} for pairs that a string match misses.

How a token map is used: the small model reads the prompt through `to_small` (a large token without a small
counterpart becomes the small model's UNK or EOS: it sees a wrong token there, the only lossy step);
its log-probabilities are spread onto the large vocabulary by `to_large`, where tokens it cannot
express get -inf, and a collaboration masks those tokens in the combined distribution too. So every
token a collaboration generates exists in both vocabularies, and during generation the small model
always reads exactly what was chosen. (Perplexity counts a test token outside the map as impossible.)
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from expertkit.encoding import special_prefix
from expertkit.errors import ExpertkitError
from expertkit.registry import Registry
from expertkit.runtime.tokens import pad_id, pad_left


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
        out = scores_by_index(small_scores, self.index)
        return out.masked_fill(~self.mapped.to(small_scores.device), float("-inf"))

    def mask_unmapped(self, scores: torch.Tensor) -> torch.Tensor:
        """-inf on large tokens the small model cannot express (the combined distribution's support)."""
        return scores.masked_fill(~self.mapped.to(scores.device), float("-inf"))

    def read_prompt(self, small, input_ids: torch.Tensor, attention_mask: torch.Tensor, adapters: list,
                    large_rows: int):
        """The small model's logits at every large position ([R, T, V_small]) and its state.

        The R small rows are `large_rows` rows of the large batch, each read by every small adapter.
        """
        return small.prefill(self.to_small(input_ids), attention_mask, adapters)

    def read_next(self, small, state, next_ids: torch.Tensor, lean: bool):
        """The small model after one more large token per row: logits [R, V_small], state."""
        return small.step(state, self.to_small(next_ids), lean=lean)

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


ALIGNMENTS: Registry = Registry("vocabulary alignment")  # name -> (large pool, small pool) -> alignment


def resolve_token_map(token_map, large, small) -> "TokenMap | TextAlignment":
    """A registered alignment's name ("text" when None), a JSON map file, or an alignment object -> the alignment."""
    if isinstance(token_map, (TokenMap, TextAlignment)):
        return token_map
    name = "text" if token_map is None else token_map
    if isinstance(name, str) and name in ALIGNMENTS:
        return ALIGNMENTS[name](large, small)
    if isinstance(name, (str, Path)):
        return TokenMap.from_json(name, large, small)
    raise ExpertkitError(f"token_map must be one of {ALIGNMENTS.listing()} or a JSON file path, "
                         f"got {type(token_map).__name__}")


# ---------------------------------------------------------------------------------------------- text alignment

ALIGNABLE_SHARE = 0.5  # below this share of the large vocabulary spelled by the small tokenizer: refuse the pair
UNALIGNED_LOG_PROB = -30.0  # what the small model "says" about a large token it cannot spell: the same for
# every small row, so the proxy's shift (expert - base) there is exactly 0 and the large model decides alone


@dataclass
class TextReadState:
    """The small model's cache, and each row's latest next-token logits (kept when a step adds no text).

    `uniform`: every row reads the same text (one large row, read by each small adapter), so every step
    adds the same small tokens to each row, and the fast one-token steps of runtime/lean.py can read them
    one after another.
    """

    pool: object
    last_logits: torch.Tensor
    uniform: bool = False


class TextAlignment:
    """The small model reads the large model's text; large candidates are judged by their text's first small token.

    - Reading: each large token's text is spelled in small tokens (`chunks[large id]`), and the small model
      reads the concatenation of the chunks of the large tokens so far: exactly the large model's text, in
      small tokens (not always as the small tokenizer would cut the whole text, which models tolerate).
      After large token t the small model's next-token distribution is taken at the last token of t's chunk.
    - Scoring: a large candidate c is given the small model's log-probability of the FIRST small token of
      c's chunk, the token the small model would read next if c were chosen (`first[large id]`). Proxy and
      fusion use the difference of two small rows there, so what the two rows share about the rest of the
      chunk cancels; defer's distribution is the small expert's, renormalized over the large vocabulary.
    - Special tokens travel by role (end-of-text to end-of-text, the start of a text to the small model's
      own prefix); a large token whose text the small tokenizer cannot spell (a lone byte of a UTF-8
      character, an unknown-token piece) adds nothing to the small model's text and gets no shift.
    """

    source = "text"
    _cache: dict[tuple[str, str], "TextAlignment"] = {}

    def __init__(self, chunks: list[list[int]], small_start: list[int], small_pad: int, vocab_large: int):
        self.chunks = chunks
        first = torch.tensor([c[0] if c else -1 for c in chunks], dtype=torch.long)
        self.first = torch.full((vocab_large,), -1, dtype=torch.long)
        self.first[:len(first)] = first[:vocab_large]
        self.aligned = self.first >= 0
        self.index = self.first.clamp(min=0)
        self.small_start, self.small_pad = small_start, small_pad

    @property
    def coverage(self) -> float:
        """Share of the large vocabulary the small tokenizer can spell."""
        return float(self.aligned.float().mean())

    @classmethod
    def between(cls, large, small) -> "TextAlignment":
        """Built once per pair of tokenizers (for Gemma's 262k tokens it takes seconds)."""
        key = (large.base.identity()["tokenizer_hash"], small.base.identity()["tokenizer_hash"])
        if key not in cls._cache:
            cls._cache[key] = cls._build(large, small)
        return cls._cache[key]

    @classmethod
    def _build(cls, large, small) -> "TextAlignment":
        ltok, stok = large.tokenizer, small.tokenizer
        texts = token_texts(ltok)
        encoded = stok(texts, add_special_tokens=False)["input_ids"]
        unk = stok.unk_token_id
        chunks = [[] if (not text or "\ufffd" in text or (unk is not None and unk in ids)) else list(ids)
                  for text, ids in zip(texts, encoded)]
        small_eos = stok.eos_token_id if stok.eos_token_id is not None else _fallback(small)
        start = special_prefix(stok) or [small_eos]
        special = set(ltok.all_special_ids)
        for lid in special:
            if lid < len(chunks):
                chunks[lid] = []
        for lid, chunk in ((ltok.eos_token_id, [small_eos]), (ltok.bos_token_id, start)):
            if lid is not None and lid < len(chunks):
                chunks[lid] = list(chunk)
        alignment = cls(chunks, start, pad_id(stok), _model_vocab(large))
        if alignment.coverage < ALIGNABLE_SHARE:
            raise ExpertkitError(
                f"the small model '{small.base.name}' cannot be aligned with the large model '{large.base.name}': "
                f"its tokenizer spells only {alignment.coverage:.0%} of the large model's tokens as text "
                f"(at least {ALIGNABLE_SHARE:.0%} needed); use a small model whose tokenizer covers the large "
                "model's text (a byte-level one), or distill one: expertkit base distill --teacher LARGE")
        return alignment

    # -- reading ------------------------------------------------------------------------------------

    def _rows(self, input_ids: torch.Tensor, attention_mask: torch.Tensor):
        """Each row's small tokens, and per large position the index of the small token that predicts next."""
        small_rows, ends = [], []
        for row, mask in zip(input_ids.cpu().tolist(), attention_mask.cpu().tolist()):
            small_row, row_ends = [], []
            for lid, real in zip(row, mask):
                if real:
                    chunk = self.chunks[lid] if lid < len(self.chunks) else []
                    small_row.extend(chunk or ([] if small_row else self.small_start))
                row_ends.append(max(len(small_row) - 1, 0))
            small_rows.append(small_row or list(self.small_start))
            ends.append(row_ends)
        return small_rows, ends

    def read_prompt(self, small, input_ids: torch.Tensor, attention_mask: torch.Tensor, adapters: list,
                    large_rows: int):
        small_rows, ends = self._rows(input_ids, attention_mask)
        ids, mask = pad_left(small_rows, self.small_pad)
        logits, state = small.prefill(ids, mask, adapters)
        pads = ids.shape[1] - torch.tensor([len(r) for r in small_rows])
        at = (torch.tensor(ends) + pads[:, None]).to(logits.device)  # [R, T] columns in the padded small batch
        aligned = logits.gather(1, at[..., None].expand(-1, -1, logits.shape[-1]))
        return aligned, TextReadState(state, logits[:, -1], uniform=large_rows == 1)

    def read_next(self, small, state: TextReadState, next_ids: torch.Tensor, lean: bool):
        chunks = [self.chunks[lid] if lid < len(self.chunks) else [] for lid in next_ids.cpu().tolist()]
        if not any(chunks):
            return state.last_logits, state
        if state.uniform:  # the same chunk in every row: one-token steps, on the lean path when asked
            pool_state, ids = state.pool, torch.tensor(chunks, device=next_ids.device)
            for column in ids.T:
                logits, pool_state = small.step(pool_state, column, lean=lean)
            return logits, TextReadState(pool_state, logits, uniform=True)
        ids, mask = pad_left([c or [self.small_pad] for c in chunks], self.small_pad)
        mask[[i for i, c in enumerate(chunks) if not c]] = 0  # a row with nothing to read only pads
        logits, pool_state = small.extend(state.pool, ids, mask)
        moved = torch.tensor([bool(c) for c in chunks], device=logits.device)[:, None]
        last = torch.where(moved, logits[:, -1], state.last_logits)
        return last, TextReadState(pool_state, last, uniform=False)

    # -- scoring ------------------------------------------------------------------------------------

    def to_large(self, small_scores: torch.Tensor) -> torch.Tensor:
        """[..., V_small] -> [..., V_large]: each large token gets its chunk's first small token's score."""
        out = scores_by_index(small_scores, self.index)
        return out.masked_fill(~self.aligned.to(small_scores.device), UNALIGNED_LOG_PROB)

    def mask_unmapped(self, scores: torch.Tensor) -> torch.Tensor:
        """Every large token stays possible (one the small model cannot spell is the large model's alone)."""
        return scores


def scores_by_index(scores: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """scores[..., index] along the last dim, taken from a 2-D view: on CPU, `index_select` on the last dim of a
    [k, B, T, V] tensor took 17 ms for a 262k index where the same on [k·B·T, V] takes 0.4 ms."""
    flat = scores.reshape(-1, scores.shape[-1])
    return flat.index_select(1, index.to(scores.device)).view(*scores.shape[:-1], len(index))


ALIGNMENTS.add("text", TextAlignment.between)
ALIGNMENTS.add("vocab", TokenMap.from_tokenizers)


def token_texts(tokenizer) -> list[str]:
    """The text each token adds after other text (SentencePiece's leading-space marker included).

    Decoding a token alone drops a SentencePiece word's leading space, so each is decoded after an anchor
    token and the anchor's own text is cut off.
    """
    anchor = tokenizer("a", add_special_tokens=False)["input_ids"][-1:]
    anchor_text = tokenizer.decode(anchor)
    size = len(tokenizer)
    decoded = tokenizer.batch_decode([anchor + [i] for i in range(size)], clean_up_tokenization_spaces=False)
    return [t[len(anchor_text):] if t.startswith(anchor_text) else t for t in decoded]

