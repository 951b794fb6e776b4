"""Turning token ids into streamed text: hold back what a stop string or a split character may still change,
and the prompt a chat request becomes."""

from __future__ import annotations

from expertkit.serve.protocol import OpenAIError

PLAIN_CHAT_STOP = "\nUser:"


class TextStream:
    """Feed generated tokens one at a time; get the text that is now safe to send, and whether a stop hit.

    `incremental=False` (a whole answer, no stop strings) only collects tokens and decodes once at the
    end: decoding per token costs more than the model step itself for a big batch of small rows.
    """

    def __init__(self, tokenizer, stops: tuple[str, ...] = (), incremental: bool = True):
        self.tokenizer, self.stops = tokenizer, tuple(s for s in stops if s)
        self.incremental = incremental or bool(self.stops)
        self.tokens: list[int] = []
        self.sent = 0  # characters of the decoded text already handed out
        self.out = ""  # all text handed out so far
        self.hold = max((len(s) for s in self.stops), default=1) - 1

    def push(self, token_id: int) -> tuple[str, bool]:
        """(new safe text, stopped). After a stop the text ends just before the stop string."""
        self.tokens.append(token_id)
        if not self.incremental:
            return "", False
        text = self.tokenizer.decode(self.tokens)
        hits = [text.find(s, max(self.sent - len(s), 0)) for s in self.stops]
        hits = [h for h in hits if h >= 0]
        if hits:
            return self._take(text, min(hits)), True
        safe = len(text) - self.hold
        while safe > self.sent and text[safe - 1] == "\ufffd":  # a multi-byte character still arriving
            safe -= 1
        return self._take(text, safe), False

    def finish(self) -> str:
        """What is left to send once generation ends without a stop string."""
        return self._take(self.tokenizer.decode(self.tokens), None)

    def _take(self, text: str, end: int | None) -> str:
        end = len(text) if end is None else end
        out = text[self.sent:end] if end > self.sent else ""
        self.sent = max(self.sent, end)
        self.out += out
        return out


def chat_prompt(tokenizer, messages: list[dict]) -> tuple[str, tuple[str, ...]]:
    """The prompt for a chat request, and the stop strings the template implies.

    With a chat template in the tokenizer, that template (with the generation prompt) is used.
    Otherwise the documented plain template: one "Role: content" line per message, then
    "Assistant:"; generation stops where the model starts a new "User:" turn.
    """
    if getattr(tokenizer, "chat_template", None):
        from jinja2 import TemplateError

        try:
            text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        except TemplateError as e:  # templates raise on conversations they do not accept (roles out of order ...)
            raise OpenAIError(400, f"the model's chat template refused these messages: {e}",
                              param="messages") from None
        return text, ()
    lines = [f"{m['role'].capitalize()}: {m['content']}" for m in messages]
    return "\n".join(lines) + "\nAssistant:", (PLAIN_CHAT_STOP,)
