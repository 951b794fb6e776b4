"""Fault injection: every request ends (its answer or one OpenAI-shaped error); a fault touches no other request.

Faulty compositions raise on their Nth step, during prefill, or while routing; they are admitted in
the same batch as healthy requests, which must end with their solo answers; the engine then serves on.
"""

from __future__ import annotations

import threading
import time

import httpx
import pytest

from expertkit.errors import ExpertkitError
from expertkit.runtime import Composition, SamplingParams, generate
from expertkit.serve.app import create_app
from expertkit.serve.engine import Engine, Job
from expertkit.serve.server import BackgroundServer, ServeOptions, build_local_service

from conftest import synthetic_documents

NEW_TOKENS = 8


class Faulty(Composition):
    """Answers like `inner` until it raises `error` at step `at` (0 = during prefill)."""

    def __init__(self, inner: Composition, name: str, at: int, error: Exception):
        self.inner, self.name, self.at, self.error = inner, name, at, error

    def prefill(self, input_ids, attention_mask, keep_last=None):
        if self.at == 0:
            raise self.error
        logits, state = self.inner.prefill(input_ids, attention_mask, keep_last)
        return logits, (state, 0)

    def step(self, state, next_ids):
        inner_state, steps = state
        if steps + 1 == self.at:
            raise self.error
        logits, inner_state = self.inner.step(inner_state, next_ids)
        return logits, (inner_state, steps + 1)


class FaultyRouter(Composition):
    """A pool-row composition (its rows join the experts' batch) whose routing raises while it decides."""

    def __init__(self, pool, name: str):
        self.pool, self.name = pool, name

    def prefill(self, input_ids, attention_mask, keep_last=None):
        raise RuntimeError("injected routing fault")

    def step(self, state, next_ids):
        raise AssertionError("never stepped")


@pytest.fixture(scope="module")
def service(served_library):
    _, library = served_library
    service = build_local_service(library, ServeOptions(max_batch=16, max_tokens=32))
    compositions = service.engine.compositions
    compositions["faulty-step"] = Faulty(compositions["alpha"], "faulty-step", 3, RuntimeError("injected"))
    compositions["faulty-prefill"] = Faulty(compositions["beta"], "faulty-prefill", 0, MemoryError("injected"))
    compositions["refusing-step"] = Faulty(compositions["alpha"], "refusing-step", 2,
                                           ExpertkitError("this composition refuses the request"))
    compositions["faulty-router"] = FaultyRouter(service.engine.pool, "faulty-router")
    yield service
    service.engine.stop()


def solo(service, model: str, prompt: str) -> str:
    return generate(service.engine.compositions[model], service.tokenizer, [prompt],
                    SamplingParams(max_new_tokens=NEW_TOKENS))[0]


def run_jobs(service, requests: list[tuple[str, str]], timeout: float = 60) -> list[list[dict]]:
    """Admit every request in ONE batch of a fresh engine; each job's events, once all have ended."""
    engine = Engine(service.engine.pool, service.engine.compositions, max_batch=16)
    events: list[list[dict]] = [[] for _ in requests]
    for i, (model, prompt) in enumerate(requests):
        ids = service.tokenizer(prompt, add_special_tokens=False)["input_ids"]
        engine.submit(Job(model, ids, SamplingParams(max_new_tokens=NEW_TOKENS), events[i].append, streaming=False))
    engine.start()  # started after every submit: all are admitted together
    try:
        deadline = time.monotonic() + timeout
        while not all(any(e["type"] in ("end", "error") for e in ev) for ev in events):
            assert time.monotonic() < deadline, f"requests never ended: {[ev[-1:] for ev in events]}"
            time.sleep(0.01)
        # one more request after the faults: the engine still serves
        after: list[dict] = []
        engine.submit(Job("alpha", [5, 6, 7], SamplingParams(max_new_tokens=2), after.append))
        while not any(e["type"] == "end" for e in after):
            assert time.monotonic() < deadline, "the engine stopped serving after the faults"
            time.sleep(0.01)
    finally:
        engine.stop()
    return events


def test_faults_end_only_their_own_requests(service):
    prompts = [d[:40] for d in synthetic_documents("alpha", 4, seed=31) + synthetic_documents("beta", 3, seed=32)]
    requests = [("faulty-step", prompts[0]), ("base", prompts[1]), ("faulty-prefill", prompts[2]),
                ("alpha", prompts[3]), ("faulty-router", prompts[4]), ("beta", prompts[5]),
                ("refusing-step", prompts[6]), ("alpha", prompts[6])]
    events = run_jobs(service, requests)
    for (model, prompt), ev in zip(requests, events):
        ends = [e for e in ev if e["type"] in ("end", "error")]
        assert len(ends) == 1, (model, ends)  # exactly one end or one error, never both, never none
        if model.startswith("faulty"):
            assert ends[0]["type"] == "error" and ends[0]["status"] == 500, (model, ends)
            assert "internal error" in ends[0]["message"]
        elif model == "refusing-step":
            assert ends[0] == {"type": "error", "status": 400, "message": "this composition refuses the request"}
        else:
            assert ends[0]["type"] == "end", (model, ends)
            assert ends[0]["full_text"] == solo(service, model, prompt), model


def ask(url: str, path: str, body: dict) -> httpx.Response:
    return httpx.post(url + path, json=body, timeout=60)


def test_http_errors_keep_the_openai_shape_and_the_server_serves_on(service, monkeypatch):
    prompt = synthetic_documents("alpha", 1, seed=33)[0][:40]
    healthy: list[httpx.Response] = []
    with BackgroundServer(create_app(service)) as server:
        # a fault after the request started, of the request's own making: 400, typed as the client's error
        # (ignore_eos: the fault comes at a decoding step, which a model ending its text first would never reach)
        refused = ask(server.url, "/v1/completions", {"model": "refusing-step", "prompt": prompt, "max_tokens": 8,
                                                      "ignore_eos": True})
        assert refused.status_code == 400
        assert refused.json()["error"]["type"] == "invalid_request_error"
        # a server fault: 500 in the OpenAI shape, while a request beside it completes as if alone
        threads = [threading.Thread(target=lambda: healthy.append(ask(server.url, "/v1/completions", {
            "model": "beta", "prompt": prompt, "max_tokens": NEW_TOKENS, "temperature": 0})))]
        threads[0].start()
        crashed = ask(server.url, "/v1/completions", {"model": "faulty-step", "prompt": prompt, "max_tokens": 8,
                                                      "ignore_eos": True})
        threads[0].join()
        assert crashed.status_code == 500 and crashed.json()["error"]["type"] == "server_error"
        assert healthy[0].json()["choices"][0]["text"] == solo(service, "beta", prompt)
        # a streamed request whose composition fails mid-way gets one error event, then the stream ends
        with httpx.stream("POST", server.url + "/v1/completions", json={
                "model": "faulty-step", "prompt": prompt, "max_tokens": 8, "stream": True, "ignore_eos": True},
                timeout=60) as r:
            chunks = [line for line in r.iter_lines() if line.startswith("data: ")]
        assert sum('"error"' in c for c in chunks) == 1 and chunks[-1] == "data: [DONE]"
        # a chat template that raises on these messages: 400, the template's own words
        monkeypatch.setattr(service.tokenizer, "chat_template", "{{ raise_exception('roles must alternate') }}",
                            raising=False)
        templated = ask(server.url, "/v1/chat/completions", {"model": "alpha", "messages": [
            {"role": "user", "content": "hi"}]})
        assert templated.status_code == 400 and "roles must alternate" in templated.json()["error"]["message"]
        # an unexpected exception anywhere in a route: a 500 in the OpenAI shape, not text/plain
        monkeypatch.setattr(service, "chat", lambda req: (_ for _ in ()).throw(RuntimeError("bug")))
        bug = ask(server.url, "/v1/chat/completions", {"model": "alpha", "messages": [
            {"role": "user", "content": "hi"}]})
        assert bug.status_code == 500 and bug.headers["content-type"].startswith("application/json")
        assert bug.json()["error"]["type"] == "server_error"
        # and the server still answers
        again = ask(server.url, "/v1/completions", {"model": "alpha", "prompt": prompt, "max_tokens": NEW_TOKENS,
                                                    "temperature": 0})
        assert again.status_code == 200 and again.json()["choices"][0]["text"] == solo(service, "alpha", prompt)
