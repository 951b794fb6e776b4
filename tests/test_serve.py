"""The OpenAI-compatible server, exercised over real HTTP on 127.0.0.1 with the official `openai` client."""

from __future__ import annotations

import json
import threading
import time

import httpx
import openai
import pytest
import torch
from conftest import synthetic_documents

from expertkit.encoding import encode_texts
from expertkit.runtime import SamplingParams, generate
from expertkit.serve.app import create_app
from expertkit.serve.engine import Engine, Job, QueueFull
from expertkit.serve.server import BackgroundServer, ServeOptions, build_local_service

KEY = "test-key"


@pytest.fixture(scope="module")
def server(served_library):
    _, library = served_library
    service = build_local_service(library, ServeOptions(max_batch=8, max_tokens=48))
    with BackgroundServer(create_app(service, api_key=KEY)) as srv:
        srv.service = service
        yield srv


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0)


def reference(server, model: str, prompt: str, **params) -> str:
    """What the library's own generate() gives for the same composition and parameters."""
    engine = server.service.engine
    composition = engine.compositions[model]
    return generate(composition, engine.tokenizer, [prompt], SamplingParams(**params))[0]


def test_models_lists_library_entries_and_auto(client):
    assert [m.id for m in client.models.list()] == ["base", "alpha", "beta", "router-lexical", "auto"]


def test_completion_equals_library_generate(client, server):
    prompt = synthetic_documents("alpha", 1, seed=5)[0][:40]
    reply = client.completions.create(model="alpha", prompt=prompt, max_tokens=12, temperature=0)
    assert reply.choices[0].text == reference(server, "alpha", prompt, max_new_tokens=12)
    assert reply.usage.completion_tokens == 12 and reply.choices[0].finish_reason == "length"


def test_concurrent_requests_for_different_experts_share_forwards(client, server):
    """Each answer equals its solo generate(); the engine stepped rows of several requests together."""
    prompts = [(model, doc[:30 + 7 * i]) for i, (model, doc) in enumerate(
        (m, d) for m in ("alpha", "beta", "base") for d in synthetic_documents("beta", 2, seed=9))]
    answers: dict[int, str] = {}
    stats = server.service.engine.stats
    steps0, rows0 = stats.steps, stats.rows_stepped

    def ask(i, model, prompt):
        answers[i] = client.completions.create(model=model, prompt=prompt, max_tokens=16, temperature=0,
                                               ).choices[0].text

    threads = [threading.Thread(target=ask, args=(i, m, p)) for i, (m, p) in enumerate(prompts)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i, (model, prompt) in enumerate(prompts):
        assert answers[i] == reference(server, model, prompt, max_new_tokens=16), (model, prompt)
    assert (stats.rows_stepped - rows0) / (stats.steps - steps0) > 1.5  # rows really were batched


def test_arrivals_for_different_adapters_are_prefilled_in_one_forward(served_library):
    """The base, two experts and a mix arriving together: one prefill; each answer equals its solo generate()."""
    from expertkit.base import load_base
    from expertkit.compose import build_compositions
    from expertkit.compose.adapters import mix_composition
    from expertkit.library import Library
    from expertkit.runtime import ExpertPool

    _, library_path = served_library
    library = Library(library_path)
    pool = ExpertPool(load_base(library.base_identity()["name"]), library)
    compositions = {c.name: c for c in build_compositions(pool)}
    mix = mix_composition(pool, "mix:alpha=0.7,beta=0.3")
    compositions[mix.name] = mix
    params = SamplingParams(max_new_tokens=10)
    asked = [(name, doc[:20 + 5 * i]) for i, (name, doc) in enumerate(
        zip(["base", "alpha", "beta", mix.name] * 2, synthetic_documents("alpha", 8, seed=3)))]
    answers: dict[int, str] = {}
    engine = Engine(pool, compositions, max_batch=16)
    for i, (name, prompt) in enumerate(asked):  # all queued before the engine starts: one arrival burst
        ids = encode_texts(engine.tokenizer, [prompt])[0]
        engine.submit(Job(name, ids, params, emit=lambda e, i=i: answers.__setitem__(i, e.get("full_text"))
                          if e["type"] == "end" else None))
    engine.start()
    try:
        deadline = time.monotonic() + 60
        while len(answers) < len(asked) and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        engine.stop()
    assert engine.stats.prefills == 1
    for i, (name, prompt) in enumerate(asked):
        assert answers[i] == generate(compositions[name], engine.tokenizer, [prompt], params)[0], name


def test_a_seed_means_the_same_in_generate_and_in_the_server(client, server):
    """One generator per prompt: a prompt's sample depends on its seed, not on the prompts beside it."""
    engine = server.service.engine
    prompts = ["patient dose", "def return self", "the a of"]
    params = SamplingParams(max_new_tokens=10, temperature=1.0, top_p=0.9, seed=7)
    alone = [generate(engine.compositions["beta"], engine.tokenizer, [p], params)[0] for p in prompts]
    assert generate(engine.compositions["beta"], engine.tokenizer, prompts, params) == alone
    reply = client.completions.create(model="beta", prompt=prompts, max_tokens=10, temperature=1.0, top_p=0.9,
                                      seed=7)
    assert [c.text for c in sorted(reply.choices, key=lambda c: c.index)] == alone


def test_sampling_is_seeded(client):
    ask = lambda seed: client.completions.create(model="beta", prompt="def", max_tokens=10, temperature=1.0,
                                                 top_p=0.9, seed=seed).choices[0].text
    assert ask(3) == ask(3)
    assert len({ask(s) for s in range(4)}) > 1


def test_streaming_matches_the_whole_answer(client):
    whole = client.completions.create(model="alpha", prompt="patient dose", max_tokens=14, temperature=0)
    chunks = list(client.completions.create(model="alpha", prompt="patient dose", max_tokens=14, temperature=0,
                                            stream=True))
    assert "".join(c.choices[0].text for c in chunks) == whole.choices[0].text
    assert chunks[-1].choices[0].finish_reason == "length"


def test_stop_strings_cut_the_text(client, server):
    full = reference(server, "beta", "def return", max_new_tokens=24)
    stop = full[5:7]
    reply = client.completions.create(model="beta", prompt="def return", max_tokens=24, temperature=0, stop=[stop])
    assert reply.choices[0].text == full[:full.index(stop)]
    assert reply.choices[0].finish_reason == "stop"


def test_chat_and_chat_streaming(client, server):
    messages = [{"role": "user", "content": "patient dose trial"}]
    reply = client.chat.completions.create(model="alpha", messages=messages, max_tokens=10, temperature=0)
    expected = reference(server, "alpha", "User: patient dose trial\nAssistant:", max_new_tokens=10,
                         stop=("\nUser:",))
    assert reply.choices[0].message.content == expected and reply.choices[0].message.role == "assistant"
    chunks = list(client.chat.completions.create(model="alpha", messages=messages, max_tokens=10, temperature=0,
                                                 stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == expected


def test_auto_routes_and_says_which_expert(client):
    prompt = synthetic_documents("beta", 1, seed=11)[0][:60]
    raw = client.completions.with_raw_response.create(model="auto", prompt=prompt, max_tokens=4, temperature=0)
    assert raw.headers["x-expertkit-expert"] == "beta"
    assert raw.parse().model_extra["expert"] == "beta"


def test_echo_logprobs_give_the_prompt_loglikelihood(client, server):
    """What lm-evaluation-harness asks: echo + logprobs + max_tokens 0 returns the prompt's token logprobs."""
    engine = server.service.engine
    ids = engine.tokenizer("patient dose trial cohort", add_special_tokens=False)["input_ids"]
    reply = client.completions.create(model="alpha", prompt=ids, max_tokens=0, echo=True, logprobs=1,
                                      temperature=0)
    lp = reply.choices[0].logprobs.token_logprobs
    assert lp[0] is None and len(lp) == len(ids)
    logits, _ = engine.compositions["alpha"].prefill(torch.tensor([ids]), torch.ones(1, len(ids), dtype=torch.long))
    expected = torch.log_softmax(logits[0, :-1], -1).gather(-1, torch.tensor(ids[1:]).unsqueeze(-1)).squeeze(-1)
    assert lp[1:] == pytest.approx(expected.tolist(), abs=1e-4)


def test_unknown_model_is_404_and_missing_key_is_401(client, server):
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.completions.create(model="../../etc/passwd", prompt="x", max_tokens=1)
    missing = httpx.get(server.url + "/v1/models")
    assert missing.status_code == 401 and "missing API key" in missing.json()["error"]["message"]
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0).models.list()


@pytest.mark.parametrize("body, param, code", [
    (b"{not json", None, None),
    (json.dumps({"model": "base", "prompt": "x", "max_tokens": -1}).encode(), "max_tokens", None),
    (json.dumps({"model": "base", "prompt": "x", "max_tokens": 10**30}).encode(), "max_tokens", None),
    (json.dumps({"model": "base", "prompt": "x", "temperature": "hot"}).encode(), "temperature", None),
    (json.dumps({"model": "base", "prompt": "x", "unknown_field": 1}).encode(), "unknown_field", None),
    (json.dumps({"model": "base", "prompt": [10**9]}).encode(), "prompt", None),
    (json.dumps({"model": "base", "prompt": "x" * 300_000}).encode(), "prompt", "context_length_exceeded"),
    (json.dumps({"model": "base", "prompt": "x", "n": 2}).encode(), "n", None),
    (json.dumps([1, 2, 3]).encode(), None, None),
    (json.dumps({"model": "base", "prompt": [[1, 2], []]}).encode(), "prompt", None),
    (json.dumps({"model": "base", "prompt": ["x"] * 500}).encode(), "prompt", None),
    (json.dumps({"model": "base", "prompt": "word " * 60, "max_tokens": 40}).encode(), "prompt",
     "context_length_exceeded"),  # the prompt alone is over the context
    (json.dumps({"model": "base", "prompt": [5] * 30, "max_tokens": 40}).encode(), "max_tokens",
     "context_length_exceeded"),  # the prompt fits, but not with max_tokens
])
def test_bad_requests_are_4xx_in_the_openai_shape(server, body, param, code):
    reply = httpx.post(server.url + "/v1/completions", content=body,
                       headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    assert reply.status_code == 400, reply.text
    error = reply.json()["error"]
    assert error["type"] == "invalid_request_error" and error["message"]
    assert (error["param"], error["code"]) == (param, code), error


def test_oversized_body_is_413(server):
    reply = httpx.post(server.url + "/v1/completions", content=b"x" * (5 * 1024 * 1024),
                       headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    assert reply.status_code == 413


def test_full_queue_is_refused(served_library, server):
    engine = Engine(server.service.engine.pool, server.service.engine.compositions, max_batch=1, max_queue=1)
    job = lambda: Job("base", [1, 2], SamplingParams(max_new_tokens=1), emit=lambda e: None)
    engine.submit(job())  # not started: it waits in the queue
    with pytest.raises(QueueFull, match="queue is full"):
        engine.submit(job())


def test_health_and_metrics(server, client):
    client.completions.create(model="base", prompt="the", max_tokens=2)
    assert httpx.get(server.url + "/health").json()["status"] == "ok"
    text = httpx.get(server.url + "/metrics").text
    assert 'expertkit_requests_total{endpoint="/v1/completions",model="base",status="200"}' in text
    assert "expertkit_generated_tokens" in text


def test_front_forwards_to_a_backend_with_adapter_names(served_library, server):
    """A routing-only front before a second expertkit server: `auto` arrives there as the expert's name."""
    from expertkit.serve.forward import build_forwarding_service

    _, library = served_library
    front_service = build_forwarding_service(library, server.url, None, None, None, "base", KEY)
    seen = []
    original = server.service.completion

    async def spy(req):
        seen.append(req.model)
        return await original(req)

    server.service.completion = spy
    try:
        with BackgroundServer(create_app(front_service)) as front:
            front_client = openai.OpenAI(base_url=front.url + "/v1", api_key="unused", max_retries=0)
            prompt = synthetic_documents("alpha", 1, seed=4)[0][:60]
            raw = front_client.completions.with_raw_response.create(model="auto", prompt=prompt, max_tokens=6,
                                                                    temperature=0)
            direct = reference(server, "alpha", prompt, max_new_tokens=6)
            streamed = "".join(c.choices[0].text for c in front_client.completions.create(
                model="beta", prompt="def", max_tokens=5, temperature=0, stream=True))
    finally:
        server.service.completion = original
    assert raw.headers["x-expertkit-expert"] == "alpha" and raw.parse().choices[0].text == direct
    assert streamed == reference(server, "beta", "def", max_new_tokens=5)
    assert seen == ["alpha", "beta"]


def test_export_vllm_names_every_adapter(served_library):
    from expertkit.serve.vllm_export import vllm_command

    _, library = served_library
    command = vllm_command(library)
    assert command.startswith("vllm serve ") and "--enable-lora" in command and "--max-lora-rank 8" in command
    assert f"alpha={(library / 'experts' / 'alpha').resolve()}" in command and "beta=" in command


def test_cli_errors_before_serving(monkeypatch, capsys, served_library, tmp_path):
    from test_cli import assert_one_line_error, run_cli

    code, _, err = run_cli(monkeypatch, capsys, "serve", tmp_path / "nowhere")
    assert_one_line_error(code, err, "no expert library at")
    _, library = served_library
    code, _, err = run_cli(monkeypatch, capsys, "serve", library, "--router", "router-missing")
    assert_one_line_error(code, err, "router 'router-missing' is not in the library")
    code, _, err = run_cli(monkeypatch, capsys, "serve", library, "--backend", "http://127.0.0.1:9")
    assert_one_line_error(code, err, "did not answer GET /v1/models")
    code, out, err = run_cli(monkeypatch, capsys, "export", "vllm", library)
    assert code == 0 and out.startswith("vllm serve") and "--lora-modules" in out


def test_collaborations_are_served_by_name(served_library, small_project):
    """With --small, `proxy:<expert>` and friends are models too, decoded in lanes beside the shared batch."""
    _, library = served_library
    service = build_local_service(library, ServeOptions(small=str(small_project), max_batch=4))
    assert {"proxy:alpha", "defer:alpha", "fusion"} <= set(service.model_names())
    prompts = {"proxy:alpha": "patient dose", "alpha": "trial cohort", "defer:alpha": "serum renal"}
    answers = {}
    with BackgroundServer(create_app(service)) as srv:
        c = openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0)

        def ask(model):
            answers[model] = c.completions.create(model=model, prompt=prompts[model], max_tokens=8,
                                                  temperature=0).choices[0].text

        threads = [threading.Thread(target=ask, args=(m,)) for m in prompts]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    for model, prompt in prompts.items():
        composition = service.engine.compositions[model]
        assert answers[model] == generate(composition, service.tokenizer, [prompt],
                                          SamplingParams(max_new_tokens=8))[0], model


def test_a_request_whose_prompts_finish_at_different_times(served_library, server):
    """Several prompts in one request on a one-row server: the first ends before the next has started."""
    _, library = served_library
    service = build_local_service(library, ServeOptions(max_batch=1))
    prompts = ["patient", "def return self import for in if else print list", "trial"]
    with BackgroundServer(create_app(service)) as srv:
        c = openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0, timeout=60)
        reply = c.completions.create(model="beta", prompt=prompts, max_tokens=3, temperature=0, echo=True,
                                     logprobs=0)
    assert [c.index for c in reply.choices] == [0, 1, 2]
    for choice, prompt in zip(reply.choices, prompts):
        assert choice.text == prompt + reference(server, "beta", prompt, max_new_tokens=3)


def test_tokenizer_endpoints_answer_as_vllm_does(server):
    """/tokenize, /detokenize, /tokenizer_info: the served tokenizer, for lm-eval's local-completions and others."""
    tokenizer, headers = server.service.tokenizer, {"Authorization": f"Bearer {KEY}"}
    text = "patient dose trial"
    reply = httpx.post(server.url + "/tokenize", headers=headers, json={"model": "alpha", "prompt": text,
                                                                        "return_token_strs": True})
    assert reply.status_code == 200, reply.text
    body = reply.json()
    assert body["tokens"] == tokenizer(text)["input_ids"] and body["count"] == len(body["tokens"])
    assert body["max_model_len"] == server.service.context_length
    assert body["token_strs"] == tokenizer.convert_ids_to_tokens(body["tokens"])
    chat = httpx.post(server.url + "/tokenize", headers=headers,
                      json={"messages": [{"role": "user", "content": text}]}).json()
    assert chat["tokens"] == tokenizer("User: " + text + "\nAssistant:", add_special_tokens=False)["input_ids"]
    back = httpx.post(server.url + "/detokenize", headers=headers, json={"tokens": body["tokens"]})
    assert back.status_code == 200 and back.json() == {"prompt": tokenizer.decode(body["tokens"])}
    info = httpx.get(server.url + "/tokenizer_info", headers=headers).json()
    assert info["tokenizer_class"] == type(tokenizer).__name__ and "vocab_file" not in info
    json.dumps(info)
    for path, body, status in [("/tokenize", {"model": "nope", "prompt": "x"}, 404),
                               ("/tokenize", {"prompt": "x", "messages": [{"role": "user", "content": "y"}]}, 400),
                               ("/tokenize", {}, 400), ("/detokenize", {"tokens": [10**9]}, 400),
                               ("/detokenize", {"tokens": "abc"}, 400)]:
        reply = httpx.post(server.url + path, headers=headers, json=body)
        assert reply.status_code == status and reply.json()["error"]["message"], (path, body, reply.text)
    assert httpx.post(server.url + "/tokenize", json={"prompt": "x"}).status_code == 401


def test_tokenize_renders_the_models_chat_template(served_library):
    from transformers import AutoTokenizer

    from expertkit.library import Library
    from expertkit.serve.protocol import TokenizeRequest
    from expertkit.serve.tokenization import tokenize, tokenizer_info

    _, library = served_library
    tokenizer = AutoTokenizer.from_pretrained(Library(library).base_identity()["name"])
    tokenizer.chat_template = "{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}" \
                              "{% if add_generation_prompt %}<assistant>{% endif %}"
    messages = [{"role": "user", "content": "dose"}]
    got = tokenize(tokenizer, 64, TokenizeRequest(messages=messages))
    expected = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert expected == "<user>dose<assistant>"
    assert got["tokens"] == tokenizer(expected, add_special_tokens=False)["input_ids"]
    plain = tokenize(tokenizer, 64, TokenizeRequest(messages=messages, add_generation_prompt=False))
    assert plain["tokens"] == tokenizer("<user>dose", add_special_tokens=False)["input_ids"]
    assert tokenizer_info(tokenizer)["chat_template"] == tokenizer.chat_template
