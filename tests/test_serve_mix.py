"""Weighted adapter mixes per request: `mix:a=0.7,b=0.3` (or the `adapters` body field) gives each row the exact
weighted sum of those experts' ΔW, in the same running batch as single-expert and base rows."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import torch

from expertkit.compose import build_compositions
from expertkit.errors import ExpertkitError
from expertkit.merging import make_recipe, merge_experts
from expertkit.runtime import BASE_ADAPTER, AdapterMix, ExpertPool, SamplingParams, generate
from expertkit.runtime.tokens import left_pad
from expertkit.serve.app import create_app
from expertkit.serve.server import BackgroundServer, ServeOptions, build_local_service

from conftest import synthetic_documents

MIX = "mix:alpha=0.7,beta=0.3"
EXACT = 1e-5


@pytest.fixture(scope="module")
def pool_with_exact_merge(sentence_library):
    """A pool over the library, plus `m-exact`: the linear 0.7/0.3 merge stored at full rank (lossless)."""
    from expertkit.base import load_base

    base = load_base(sentence_library.base_identity()["name"])
    pool = ExpertPool(base, sentence_library)
    if not sentence_library.has("merge", "m-exact"):
        merge_experts(pool, sentence_library, make_recipe(method="linear", experts=["alpha", "beta"],
                                                          weights=[0.7, 0.3], max_error=1e-6), "m-exact")
    pool.ensure(["m-exact"])
    return pool


def prompts(tokenizer) -> tuple[torch.Tensor, torch.Tensor]:
    texts = [synthetic_documents("alpha", 1, seed=3)[0][:60], synthetic_documents("beta", 1, seed=4)[0][:30], "the"]
    return left_pad(tokenizer, texts)


def test_a_mix_equals_the_linear_merge_and_peft_with_the_merged_delta(pool_with_exact_merge, sentence_library):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    pool = pool_with_exact_merge
    mix, merged = build_compositions(pool, [MIX, "m-exact"])
    assert mix.name == MIX and mix.adapter == AdapterMix((("alpha", 0.7), ("beta", 0.3)))
    ids, mask = prompts(pool.tokenizer)
    mixed, _ = mix.prefill(ids, mask)
    torch.testing.assert_close(mixed, merged.prefill(ids, mask)[0], rtol=0, atol=EXACT)
    fresh = AutoModelForCausalLM.from_pretrained(sentence_library.base_identity()["name"])
    peft = PeftModel.from_pretrained(fresh, str(sentence_library.get("m-exact").path)).eval()
    for row in range(len(ids)):
        n = int(mask[row].sum())
        with torch.no_grad():
            alone = peft(ids[row:row + 1, -n:]).logits[0]
        torch.testing.assert_close(mixed[row, -n:], alone, rtol=0, atol=EXACT)


def test_a_batch_of_mix_single_and_base_rows_equals_each_alone(pool_with_exact_merge):
    pool = pool_with_exact_merge
    ids, mask = prompts(pool.tokenizer)
    other = AdapterMix((("beta", 2.0), ("alpha", 0.25)))
    rows = [AdapterMix((("alpha", 0.7), ("beta", 0.3))), "alpha", BASE_ADAPTER]
    for adapters in (rows, [other, rows[0], "beta"]):
        batched, state = pool.prefill(ids, mask, adapters)
        stepped, _ = pool.step(state, ids[:, -1])
        for row, adapter in enumerate(adapters):
            alone, alone_state = pool.prefill(ids[row:row + 1], mask[row:row + 1], [adapter])
            torch.testing.assert_close(batched[row], alone[0], rtol=0, atol=EXACT)
            torch.testing.assert_close(stepped[row], pool.step(alone_state, ids[row:row + 1, -1])[0][0], rtol=0,
                                       atol=EXACT)


@pytest.mark.parametrize("spec, message", [
    ("mix:alpha=0.7,gamma=0.3", "not adapters served here"), ("mix:alpha=-1", "finite number >= 0"),
    ("mix:alpha=nan", "finite number >= 0"), ("mix:alpha=lots", "finite number >= 0"), ("mix:", "mixes nothing"),
    ("mix:alpha", "finite number >= 0"), ("mix:alpha=1,alpha=2", "twice"), ("mix:alpha=0,beta=0", "every weight is 0"),
])
def test_bad_mixes_are_one_clear_error(pool_with_exact_merge, spec, message):
    with pytest.raises(ExpertkitError, match=message):
        build_compositions(pool_with_exact_merge, [spec])


def test_the_server_batches_mixes_with_everything_else(sentence_library):
    service = build_local_service(sentence_library.root, ServeOptions(max_batch=8))
    texts = ["patient dose", "def return self", "the trial", "import for"]
    asks = [{"model": MIX}, {"model": "alpha"}, {"model": "base"},
            {"model": "mix", "adapters": [{"name": "beta", "weight": 0.5}, {"name": "alpha", "weight": 0.5}]}]
    params = SamplingParams(max_new_tokens=8)
    pool = service.engine.pool
    expected = [generate(c, service.tokenizer, [t], params)[0] for c, t in
                zip(build_compositions(pool, [MIX, "alpha", "base", "mix:beta=0.5,alpha=0.5"]), texts)]
    with BackgroundServer(create_app(service)) as server:
        def ask(i: int) -> httpx.Response:
            return httpx.post(server.url + "/v1/completions", timeout=60, json={
                **asks[i], "prompt": texts[i], "max_tokens": 8, "temperature": 0})

        with ThreadPoolExecutor(len(asks)) as threads:
            replies = list(threads.map(ask, range(len(asks))))
        assert [r.status_code for r in replies] == [200] * len(asks), [r.text for r in replies]
        assert [r.json()["choices"][0]["text"] for r in replies] == expected
        assert replies[0].headers["X-Expertkit-Expert"] == MIX
        models = httpx.get(server.url + "/v1/models").json()["data"]
        assert not any(m["id"].startswith("mix:") for m in models)  # a mix is asked for, not listed
        bad = [{"model": "mix:alpha=0.7,gamma=0.3"}, {"model": "mix:alpha=-0.5"}, {"model": "mix:"},
               {"model": "mix", "adapters": [{"name": "alpha", "weight": -1}]},
               {"model": "mix", "adapters": [{"name": "alpha", "weight": "heavy"}]},
               {"model": "mix", "adapters": []}]
        for body in bad:
            reply = httpx.post(server.url + "/v1/completions", json={**body, "prompt": "hi", "max_tokens": 2})
            assert reply.status_code == 400, (body, reply.text)
            assert reply.json()["error"]["message"]
        assert httpx.get(server.url + "/health").status_code == 200
