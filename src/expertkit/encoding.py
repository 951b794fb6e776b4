"""Text as the ids a model reads: with the special tokens its tokenizer puts before every text."""

from __future__ import annotations


def special_prefix(tokenizer) -> list[int]:
    """The ids the tokenizer puts before every text: Gemma's <bos>; none for GPT-2-style tokenizers.

    Every path that feeds the model text (training blocks, scoring, routing, prompts, serving) starts
    with them, as the model was trained: Gemma-3 without <bos> is a broken model, not a harder task.
    """
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    full = tokenizer("a")["input_ids"]
    for start in range(len(full) - len(plain) + 1):
        if full[start:start + len(plain)] == plain:
            return list(full[:start])
    return []


def encode_texts(tokenizer, texts: list[str]) -> list[list[int]]:
    """Texts as the model reads them: the tokenizer's prefix once (not again when a text already has it)."""
    prefix = special_prefix(tokenizer)
    rows = tokenizer(list(texts), add_special_tokens=False)["input_ids"] if texts else []
    return [list(r) if r[:len(prefix)] == prefix else prefix + list(r) for r in rows]
