"""What a user typed, out of the prompt a model reads: a router decides from the message, not the template.

A chat request reaches a router as the model's chat template filled in: a system prompt the user never
wrote ("You are a helpful AI assistant named SmolLM ..."), role headers, and the generation prompt. The
same words then read differently as a chat and as a raw prompt, and the template's own text dominates
short messages. The template's scaffold around the last user message is found once per tokenizer, by
rendering a sentinel message, and cut away; a prompt not in that shape is read as it is.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

SENTINEL = "ExpertkitRoutingSentinel"


@dataclass(frozen=True)
class ChatScaffold:
    """The text that opens the last user turn of a chat prompt, and what follows that turn to the end."""

    header: str
    suffix: str

    def user_text(self, text: str) -> str | None:
        """The last user message of `text` when it is a chat prompt in this template; None otherwise."""
        if not text.endswith(self.suffix):
            return None
        at = text.rfind(self.header, 0, len(text) - len(self.suffix))
        if at < 0:
            return None
        return text[at + len(self.header): len(text) - len(self.suffix)]


@lru_cache(maxsize=16)
def chat_scaffold(tokenizer) -> ChatScaffold | None:
    """The scaffold of the tokenizer's chat template (None without one, or when it cannot be rendered)."""
    if not getattr(tokenizer, "chat_template", None):
        return None
    try:
        text = tokenizer.apply_chat_template([{"role": "user", "content": SENTINEL}], tokenize=False,
                                             add_generation_prompt=True)
    except Exception:  # noqa: BLE001  (a template that cannot render a lone user turn: read prompts as they are)
        return None
    if text.count(SENTINEL) != 1:
        return None
    before, after = text.split(SENTINEL)
    if not after:
        return None  # no generation prompt after the message: a chat prompt cannot be told from raw text
    opening = [before.rfind(token) for token in tokenizer.all_special_tokens if token and token in before]
    return ChatScaffold(before[max(opening):] if opening else before, after)


def user_text(tokenizer, ids: list[int]) -> str | None:
    """The last user message of a chat prompt given as ids (special tokens kept), or None for a raw prompt."""
    scaffold = chat_scaffold(tokenizer)
    if scaffold is None:
        return None
    return scaffold.user_text(tokenizer.decode(ids, skip_special_tokens=False))
