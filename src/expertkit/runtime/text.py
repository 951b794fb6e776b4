"""Generated token ids as text: hold back what a stop string or a split character may still change.

The one stop-string rule: the generation loop (runtime/decoding.py) and so every caller of it, the CLI,
the scorecard and the server, cut text here.
"""

from __future__ import annotations


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
