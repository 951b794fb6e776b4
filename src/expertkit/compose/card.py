"""Knowledge card (CooK / BLADE): the small expert writes a short domain passage into the large model's prompt.

Per row:
1. relevance = the expert's mean log-likelihood advantage over the small base on the query, in nats per
   token (log p_expert − log p_small_base, averaged over the query's predicted tokens): how much better
   the expert knows this text than the model it was tuned from, i.e. the per-token log-odds of the
   expert's domain (what the `likelihood` router uses). Chosen over a router posterior because it needs
   nothing but the expert and costs one batched small forward (expert and base rows together).
2. if relevance > threshold, the expert greedily continues the query for `card_tokens` tokens (KV-cached,
   stopping at EOS); that passage + `separator` is prepended to the large model's prompt.
3. the large model decodes from card + prompt; steps are plain large steps on that cache.

What prefill returns (it must stay honest for perplexity): logits for the ORIGINAL prompt positions only
([B, T, V], aligned with the input). The card is written from the first `query_tokens` real tokens of a
row (all of them by default, which is what generation wants), so it has seen tokens 0..q-1. Position t
predicts token t+1, so it may condition on the card only when t >= q-1; earlier positions get the large
model's logits without the card (one more large forward over those rows). Scoring a block with
query_tokens=q therefore measures "the card written from the first q tokens helps predict the rest".

The card travels as text (small tokenizer -> text -> large tokenizer), so this strategy works even when
the two models' vocabularies differ; only the relevance score needs the small model's own ids.
"""

from __future__ import annotations

import torch

from expertkit.compose.adapters import AdapterComposition
from expertkit.compose.collaborate import Parameterized, checked_params, collaboration
from expertkit.config import CardParams
from expertkit.encoding import special_prefix
from expertkit.errors import ExpertkitError
from expertkit.runtime import BASE_ADAPTER, Composition, ExpertPool, PoolState, SamplingParams, generate_ids
from expertkit.runtime.logprobs import mean_token_log_prob
from expertkit.runtime.tokens import encode_prompts, pad_id, pad_left, real_rows


class KnowledgeCardComposition(Parameterized, Composition):
    """The large model answers; a relevant small expert first writes it a domain passage (the card)."""

    Params = CardParams
    # scored on a block, the card is written from its first tokens (the context) and must not see the rest
    decides_from_prompt = True

    def __init__(self, large: ExpertPool, small: ExpertPool, expert: str, separator: str = "\n\n",
                 name: str | None = None, token_map=None, **params):
        self.align_by(token_map or "text")
        if expert not in small.adapter_names:
            raise ExpertkitError(f"expert '{expert}' is not loaded on the small model '{small.base.name}' "
                                 f"(loaded: {small.adapter_names}); use an expert trained on that small base")
        self.large, self.small, self.expert, self.name = large, small, expert, name or f"card:{expert}"
        self.params = checked_params(CardParams, params, self.name)
        self.writer = AdapterComposition(small, expert, f"{self.name} writer")  # the expert alone, on the small model
        self.separator_ids = large.tokenizer(separator, add_special_tokens=False)["input_ids"]
        self.shared_vocab = large.base.identity()["tokenizer_hash"] == small.base.identity()["tokenizer_hash"]
        self.last_relevance: list[float] = []
        self.last_cards: list[str | None] = []  # the passage written for each row of the last prefill (None: none)
        self.rows = self.carded = 0

    def align_by(self, token_map: str) -> None:
        if token_map != "text":
            raise ExpertkitError("card passes text between the models, so it takes no token map; leave token_map "
                                 "out (or give 'text', what it does anyway)")

    def stats(self) -> dict:
        return {"card_fraction": self.carded / max(self.rows, 1), "rows": self.rows,
                "relevance": self.last_relevance[0] if len(self.last_relevance) == 1 else self.last_relevance}

    # -- the small model's side -------------------------------------------------------------------------

    def _to_small(self, rows: list[list[int]]) -> list[list[int]]:
        """Query ids in the small model's vocabulary (the same ids when the vocabularies are the same)."""
        if self.shared_vocab:
            return rows
        return encode_prompts(self.small.tokenizer, self.large.tokenizer.batch_decode(rows, skip_special_tokens=True))

    @torch.no_grad()
    def relevance(self, queries: list[list[int]]) -> list[float]:
        """Mean log p_expert − log p_small_base over each query's predicted tokens (0 when it has one token)."""
        ids, mask = pad_left(queries, pad_id(self.small.tokenizer))
        n = len(queries)
        logits, _ = self.small.prefill(ids.repeat(2, 1), mask.repeat(2, 1), [self.expert] * n + [BASE_ADAPTER] * n)
        mean = mean_token_log_prob(logits, ids.repeat(2, 1), mask.repeat(2, 1))
        return (mean[:n] - mean[n:]).tolist()

    @torch.no_grad()
    def write_cards(self, queries: list[list[int]]) -> list[str]:
        """The expert's greedy continuation of each query, `card_tokens` long at most (stops at EOS)."""
        texts = generate_ids(self.writer, self.small.tokenizer, queries,
                             SamplingParams(max_new_tokens=self.params.card_tokens))
        return [t.strip() for t in texts]

    # -- the large model's side -------------------------------------------------------------------------

    def prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, keep_last: int | None = None):
        prompts = real_rows(input_ids, attention_mask)
        query_len = [min(len(p), self.params.query_tokens or len(p)) for p in prompts]
        queries = self._to_small([p[:q] for p, q in zip(prompts, query_len)])
        self.last_relevance = self.relevance(queries)
        use = [score > self.params.threshold for score in self.last_relevance]
        chosen = [i for i, u in enumerate(use) if u]
        cards = dict(zip(chosen, self.write_cards([queries[i] for i in chosen]))) if chosen else {}
        self.last_cards = [cards.get(i) for i in range(len(prompts))]
        self.rows, self.carded = self.rows + len(prompts), self.carded + len(chosen)
        tok = self.large.tokenizer
        prefix = special_prefix(tok)  # the card goes after the model's own prefix (BOS), before the prompt
        start = [len(prefix) if p[:len(prefix)] == prefix else 0 for p in prompts]
        rows = [p[:s] + (tok(cards[i], add_special_tokens=False)["input_ids"] + self.separator_ids if i in cards else [])
                + p[s:] for i, (p, s) in enumerate(zip(prompts, start))]
        width = max(len(r) for r in rows)
        if self.large.context_length and width > self.large.context_length:
            raise ExpertkitError(f"card + prompt is {width} tokens, over the large model's context of "
                                 f"{self.large.context_length}; lower card_tokens or shorten the prompt")
        ids, mask = pad_left(rows, pad_id(tok))
        logits, state = self.large.prefill(ids, mask, [BASE_ADAPTER] * len(rows))
        logits = logits[:, -input_ids.shape[1]:]  # rows are right-aligned: the original prompt's columns
        if chosen:  # positions before the query's last token must not see a card written from later tokens
            plain, _ = self.large.prefill(input_ids[chosen], attention_mask[chosen], [BASE_ADAPTER] * len(chosen))
            pads = (attention_mask[chosen] == 0).sum(-1)
            before = torch.arange(input_ids.shape[1])[None] < (pads + torch.tensor([query_len[i] for i in chosen])
                                                                - 1)[:, None]
            logits = logits.clone()
            logits[chosen] = torch.where(before[..., None].to(logits.device), plain, logits[chosen])
        return (logits[:, -keep_last:] if keep_last else logits), state

    def step(self, state: PoolState, next_ids: torch.Tensor):
        return self.large.step(state, next_ids)


@collaboration("card", CardParams)
def _card(large, small, expert, **options):
    return KnowledgeCardComposition(large, small, expert, **options)
