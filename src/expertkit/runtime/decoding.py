"""The one generation loop: prefill, then one step per token until max tokens, end-of-text or a stop string.

`Sequence` is one row being generated (its seeded generator, its tokens, its text and when it ends);
`generate_ids` drives a batch of them through a composition. The server engine drives the same
Sequences step by step in its running batch, so a seed, a stop string and end-of-text mean the same
thing from the CLI, the scorecard, a collaboration and the server.
"""

from __future__ import annotations

import torch

from expertkit.errors import ExpertkitError
from expertkit.runtime.composition import Composition
from expertkit.runtime.sampling import SamplingParams, choose_next
from expertkit.runtime.text import TextStream
from expertkit.runtime.tokens import encode_prompts, pad_id, pad_left


class Sequence:
    """One row being generated. `push` each chosen token; `finish_reason` is set once the row is done."""

    def __init__(self, tokenizer, params: SamplingParams, ignore_eos: bool = False, incremental: bool = True):
        self.params, self.eos, self.ignore_eos = params, tokenizer.eos_token_id, ignore_eos
        self.generator = torch.Generator().manual_seed(params.seed)
        self.stream = TextStream(tokenizer, params.stop, incremental=incremental)
        self.generated: list[int] = []
        self.finish_reason: str | None = None  # "stop" (end-of-text or a stop string) or "length"
        self.stop_string = False
        self.end_of_text = False
        if params.max_new_tokens == 0:
            self.finish_reason = "length"

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    def push(self, token: int) -> str:
        """Take the chosen token; returns the text that is now safe to hand out."""
        if token == self.eos and not self.ignore_eos:
            self.finish_reason, self.end_of_text = "stop", True
            return ""
        self.generated.append(token)
        text, stopped = self.stream.push(token)
        if stopped:
            self.finish_reason, self.stop_string = "stop", True
        elif len(self.generated) >= self.params.max_new_tokens:
            self.finish_reason = "length"
        return text

    def rest(self) -> str:
        """The text not handed out yet, once done (after a stop string there is none: the rest is cut)."""
        return "" if self.stop_string else self.stream.finish()

    @property
    def text(self) -> str:
        """All text generated, once done."""
        self.rest()
        return self.stream.out


def choose_tokens(sequences: list[Sequence], logits: torch.Tensor) -> list[int]:
    """Row i's next token for sequence i: one batched argmax for the greedy rows, a seeded draw for the others."""
    greedy = logits.argmax(dim=-1).tolist()
    return [greedy[i] if s.params.temperature == 0 else int(choose_next(logits[i:i + 1], s.params, [s.generator])[0])
            for i, s in enumerate(sequences)]


def generate(composition: Composition, tokenizer, prompts: list[str], params: SamplingParams = SamplingParams(),
             context_length: int | None = None) -> list[str]:
    """Continue each prompt; returns only the new text of each row."""
    return generate_ids(composition, tokenizer, encode_prompts(tokenizer, prompts), params, context_length)


@torch.no_grad()
def generate_ids(composition: Composition, tokenizer, rows: list[list[int]], params: SamplingParams = SamplingParams(),
                 context_length: int | None = None) -> list[str]:
    """Continue each prompt given as token ids; returns only the new text of each row."""
    input_ids, mask = pad_left(rows, pad_id(tokenizer))
    if context_length and input_ids.shape[1] + params.max_new_tokens > context_length:
        raise ExpertkitError(f"prompt of {input_ids.shape[1]} tokens + max_new_tokens {params.max_new_tokens} "
                             f"exceeds the model's context of {context_length}; shorten one of them")
    sequences = [Sequence(tokenizer, params, incremental=False) for _ in rows]
    if params.max_new_tokens == 0:
        return [""] * len(rows)
    logits, state = composition.prefill(input_ids, mask, keep_last=1)
    logits = logits[:, -1]
    while True:
        tokens = choose_tokens(sequences, logits)
        for sequence, token in zip(sequences, tokens):
            if not sequence.done:
                sequence.push(token)
        if all(s.done for s in sequences):
            return [s.text for s in sequences]
        logits, state = composition.step(state, torch.tensor(tokens))
