"""Every served answer is the answer of PEFT alone on that adapter (a fresh model, not the server's pool).

A fresh server over a library of two experts and two merges gets single- and multi-prompt requests for
different experts in an order that exercises start-up, lane changes, uniform and mixed batches. Each
echoed prompt log-probability and each greedy token (with its log-probability, end-of-text included)
must equal what `PeftModel.from_pretrained` computes for that adapter with full forwards.
"""

from __future__ import annotations

import threading

import httpx
import pytest
import torch

from expertkit.serve.app import create_app
from expertkit.serve.server import BackgroundServer, ServeOptions, build_local_service

from conftest import synthetic_documents

TOLERANCE = 1e-4  # per token, in nats


class PeftReference:
    """One PeftModel per adapter, each on its own fresh copy of the base: nothing shared with the server."""

    def __init__(self, library):
        self.library, self.models = library, {}

    def model(self, name: str):
        if name not in self.models:
            from peft import PeftModel
            from transformers import AutoModelForCausalLM

            model = AutoModelForCausalLM.from_pretrained(self.library.base_identity()["name"])
            if name != "base":
                model = PeftModel.from_pretrained(model, str(self.library.get(name).path))
            self.models[name] = model.eval()
        return self.models[name]

    @torch.no_grad()
    def answer(self, name: str, prompt: list[int], max_tokens: int, eos: int) -> tuple[list[float], list[int]]:
        """Prompt logprobs (from the 2nd token), then greedy tokens up to end-of-text, with their logprobs."""
        model, ids = self.model(name), list(prompt)
        log_probs = model(torch.tensor([ids])).logits[0].float().log_softmax(-1)
        entries = [float(log_probs[t - 1, ids[t]]) for t in range(1, len(ids))]
        generated = []
        for _ in range(max_tokens):
            last = model(torch.tensor([ids])).logits[0, -1].float().log_softmax(-1)
            token = int(last.argmax())
            entries.append(float(last[token]))
            generated.append(token)
            if token == eos:
                break
            ids.append(token)
        return entries, generated


def ask(url: str, model: str, prompts: list[list[int]], max_tokens: int) -> list[dict]:
    reply = httpx.post(url + "/v1/completions", json={
        "model": model, "prompt": prompts if len(prompts) > 1 else prompts[0], "max_tokens": max_tokens,
        "temperature": 0, "echo": True, "logprobs": 1, "seed": 1234}, timeout=120)
    assert reply.status_code == 200, reply.text
    return sorted(reply.json()["choices"], key=lambda c: c["index"])


def test_every_answer_equals_peft_alone_on_its_adapter(sentence_library):
    service = build_local_service(sentence_library.root, ServeOptions(max_batch=8))
    tokenizer, eos = service.tokenizer, service.tokenizer.eos_token_id
    docs = synthetic_documents("alpha", 6, seed=11) + synthetic_documents("beta", 6, seed=12)
    # whole sentences (the experts were trained to end them with end-of-text) and cut ones
    tokens = [tokenizer(d, add_special_tokens=False)["input_ids"] for d in docs]
    prompts = [ids[-40:] if i % 2 else ids[:20] for i, ids in enumerate(tokens)]
    sequential = [("m-ties", [0]), ("alpha", [1]), ("alpha", [2, 3, 4]), ("beta", [5]), ("base", [6, 7]),
                  ("m-linear", [8]), ("alpha", [9])]
    concurrent = [("alpha", [10]), ("beta", [11]), ("m-linear", [1, 2]), ("base", [3]), ("m-ties", [4, 5])]
    answers: list[tuple[str, list[int], dict]] = []
    with BackgroundServer(create_app(service)) as server:
        for model, rows in sequential:
            answers += [(model, prompts[r], c) for r, c in zip(rows, ask(server.url, model, [prompts[r] for r in rows], 6))]
        replies: dict[int, list[dict]] = {}
        threads = [threading.Thread(target=lambda i=i, m=m, rows=rows: replies.__setitem__(
            i, ask(server.url, m, [prompts[r] for r in rows], 6))) for i, (m, rows) in enumerate(concurrent)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        for i, (model, rows) in enumerate(concurrent):
            answers += [(model, prompts[r], c) for r, c in zip(rows, replies[i])]
    service.engine.stop()

    reference = PeftReference(sentence_library)
    ended_on_eos = 0
    for model, prompt, choice in answers:
        expected, generated = reference.answer(model, prompt, 6, eos)
        served = choice["logprobs"]["token_logprobs"]
        assert served[0] is None and len(served) == len(prompt) + len(generated), (model, choice["finish_reason"])
        assert served[1:] == pytest.approx(expected, abs=TOLERANCE), model
        served_text = choice["text"][len(tokenizer.decode(prompt)):]
        assert served_text == tokenizer.decode([t for t in generated if t != eos]), model
        ended_on_eos += generated[-1] == eos and choice["finish_reason"] == "stop"
        # what lm-eval's local-completions sums for a scored continuation: everything but the last entry
        assert sum(served[len(prompt):-1]) == pytest.approx(sum(expected[len(prompt) - 1:-1]), abs=TOLERANCE)
    assert ended_on_eos >= 2  # the end-of-text path (where the served logprobs once lost an entry) was exercised
