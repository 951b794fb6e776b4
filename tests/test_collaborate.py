"""Collaborative decoding: a small expert steering a large model (proxy-tuning, deferral)."""

import pytest
import torch

from expertkit.base import load_base
from expertkit.build import build_base
from expertkit.compose.collaborate import (
    DeferComposition,
    FusionComposition,
    ProxyComposition,
    build_collaboration,
    collaboration_names,
    collaboration_strategies,
)
from expertkit.config import load_config
from expertkit.errors import ExpertkitError
from expertkit.library import Library
from expertkit.runtime import BASE_ADAPTER, ExpertPool, SamplingParams, generate
from expertkit.runtime.tokens import left_pad
from expertkit.workflow import load_project_base

from conftest import MICRO_BUILD, assert_cached_steps_match, read_json, write_project
from test_cli import assert_cli_generated, assert_one_line_error, capture_generations, run_cli


@pytest.fixture(scope="module")
def pools(small_project, micro_base_dir):
    """(large pool = the micro base, small pool = the small base with expert 'alpha')."""
    cfg, small = load_project_base(small_project)
    return ExpertPool(load_base(str(micro_base_dir))), ExpertPool(small, Library(cfg.library))


def _ids(pool, texts):
    return left_pad(pool.tokenizer, texts)


def test_alpha_zero_reproduces_the_large_models_greedy_generate(pools):
    large, small = pools
    proxy = ProxyComposition(large, small, "alpha", alpha=0.0)
    prompt = "patient dose trial"
    ours = generate(proxy, large.tokenizer, [prompt], SamplingParams(max_new_tokens=16))[0]
    ids = large.tokenizer(prompt, return_tensors="pt")["input_ids"]
    reference = large.base.model.generate(ids, max_new_tokens=16, do_sample=False,
                                          pad_token_id=large.tokenizer.pad_token_id)
    expected = large.tokenizer.decode(reference[0, ids.shape[1]:])
    assert ours == expected.split(large.tokenizer.eos_token)[0]


def test_one_batched_small_forward_equals_separate_forwards(pools):
    large, small = pools
    ids, mask = _ids(large, ["patient dose", "the a of and to in is was"])
    proxy = ProxyComposition(large, small, "alpha", alpha=0.7)
    combined, _ = proxy.prefill(ids, mask)
    lp = lambda logits: torch.log_softmax(logits.float(), -1)  # noqa: E731
    large_lp = lp(large.prefill(ids, mask, [BASE_ADAPTER] * 2)[0])
    expert_lp = lp(small.prefill(ids, mask, ["alpha"] * 2)[0])
    base_lp = lp(small.prefill(ids, mask, [BASE_ADAPTER] * 2)[0])
    torch.testing.assert_close(combined, large_lp + 0.7 * (expert_lp - base_lp), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(expert_lp, base_lp)


@pytest.mark.parametrize("make", [lambda l, s: ProxyComposition(l, s, "alpha", alpha=1.0),
                                  lambda l, s: DeferComposition(l, s, "alpha", threshold=3.0)])
def test_cached_steps_equal_recomputing_the_sequence(pools, make):
    large, small = pools
    composition = make(large, small)
    ids = torch.randint(3, 250, (2, 10), generator=torch.Generator().manual_seed(4))
    mask = torch.ones_like(ids)
    assert_cached_steps_match(composition, ids, mask, split=5)


def test_defer_threshold_moves_tokens_between_the_models(pools):
    large, small = pools
    ids, mask = _ids(large, ["patient dose trial cohort"])
    lp = lambda logits: torch.log_softmax(logits.float(), -1)  # noqa: E731
    always = DeferComposition(large, small, "alpha", threshold=0.0)
    torch.testing.assert_close(always.prefill(ids, mask)[0], lp(large.prefill(ids, mask, [BASE_ADAPTER])[0]))
    assert always.deferred_fraction == 1.0
    never = DeferComposition(large, small, "alpha", threshold=1e9)
    torch.testing.assert_close(never.prefill(ids, mask)[0], lp(small.prefill(ids, mask, ["alpha"])[0]))
    assert never.deferred_fraction == 0.0


def test_bad_inputs(pools, tmp_path):
    large, small = pools
    with pytest.raises(ExpertkitError, match="bad value for 'alpha': Input should be greater than or equal to 0"):
        ProxyComposition(large, small, "alpha", alpha=-0.5)
    with pytest.raises(ExpertkitError, match=r"expert\(s\) \['beta'\] are not loaded on the small model"):
        ProxyComposition(large, small, "beta")
    other_build = {**MICRO_BUILD, "vocab_size": 320}
    other = load_base(str(build_base(load_config(write_project(tmp_path, str(tmp_path / "other"),
                                                               base={"build": other_build})))))
    # another vocabulary: aligned by text unless asked otherwise (tests/test_text_alignment.py)
    assert ProxyComposition(ExpertPool(other), small, "alpha").token_map.source == "text"


def test_fusion_with_one_expert_is_proxy_and_caches_match(pools):
    large, small = pools
    ids = torch.randint(3, 250, (2, 9), generator=torch.Generator().manual_seed(5))
    mask = torch.ones_like(ids)
    fusion = FusionComposition(large, small, ["alpha"], alpha=0.8)
    proxy = ProxyComposition(large, small, "alpha", alpha=0.8)
    torch.testing.assert_close(fusion.prefill(ids, mask)[0], proxy.prefill(ids, mask)[0])
    two = FusionComposition(large, small, ["alpha", BASE_ADAPTER], alpha=1.0)  # 2nd "expert": the bare base
    assert_cached_steps_match(two, ids, mask, split=4)


def test_registry_builds_every_listed_spec(pools):
    large, small = pools
    names = collaboration_names(small.adapter_names)
    assert set(names) == {"proxy:alpha", "defer:alpha", "card:alpha", "fusion"}
    for spec in names:
        assert build_collaboration(spec, large, small).name == spec
    proxy = build_collaboration("proxy:alpha", large, small, alpha=0.5, threshold=None)
    assert isinstance(proxy, ProxyComposition) and proxy.params.alpha == 0.5
    assert build_collaboration("defer:alpha", large, small).params.threshold == collaboration_strategies()["defer"]["threshold"]
    assert collaboration_names(ExpertPool(small.base).adapter_names) == []  # a small model without experts offers nothing


@pytest.mark.parametrize("spec, params, message", [
    ("prox:alpha", {}, "unknown collaboration strategy 'prox'"),
    ("proxy:beta", {}, "unknown expert 'beta' in 'proxy:beta'"),
    ("proxy", {}, "no expert in 'proxy'"),
    ("fusion:alpha", {}, "'fusion' takes no expert"),
    ("defer:alpha", {"alpha": 1.0}, "strategy 'defer' takes no parameter(s) ['alpha']"),
    ("proxy:alpha", {"alpha": -1.0}, "bad value for 'alpha': Input should be greater than or equal to 0"),
    ("proxy:alpha", {"alpha": float("inf")}, "bad value for 'alpha': Input should be a finite number"),
])
def test_registry_errors_list_the_choices(pools, spec, params, message):
    large, small = pools
    with pytest.raises(ExpertkitError) as info:
        build_collaboration(spec, large, small, **params)
    assert message in str(info.value)


def test_cli_generate_with_a_small_model(monkeypatch, capsys, pools, small_project, micro_base_dir, tmp_path):
    large, small = pools  # the same two models the command loads, built here by the library API
    lp = lambda logits: torch.log_softmax(logits.float(), -1)  # noqa: E731
    ids, mask = _ids(large, ["patient dose trial", "the a of"])
    proxy = ProxyComposition(large, small, "alpha", alpha=0.5)
    # the options matter: proxy at alpha 0.5 is neither the large model alone nor proxy at the default alpha 1
    steered = proxy.prefill(ids, mask)[0]
    assert not torch.allclose(steered, lp(large.prefill(ids, mask, [BASE_ADAPTER] * 2)[0]))
    assert not torch.allclose(steered, ProxyComposition(large, small, "alpha").prefill(ids, mask)[0])
    large_project = write_project(tmp_path, str(micro_base_dir))
    args = ("generate", large_project, "patient dose", "--small", small_project, "--max-tokens", "6")
    calls = capture_generations(monkeypatch)
    code, out, err = run_cli(monkeypatch, capsys, *args, "--model", "proxy:alpha", "--alpha", "0.5")
    assert code == 0, err
    assert_cli_generated(out, calls, "patient dose", proxy, large.tokenizer, max_new_tokens=6)
    code, out, err = run_cli(monkeypatch, capsys, *args, "--model", "defer:alpha", "--threshold", "2")
    assert code == 0 and "deferred_fraction" in err, err
    code, out, err = run_cli(monkeypatch, capsys, *args, "--model", "card:alpha", "--threshold", "-100")
    assert code == 0 and "card_fraction: 1" in err, err
    library = small_project.parent / "library"  # the small model named by its library folder works too
    calls.clear()
    code, out, err = run_cli(monkeypatch, capsys, "generate", large_project, "patient dose", "--small", library,
                             "--model", "fusion", "--max-tokens", "3")
    assert code == 0, err
    fusion = build_collaboration("fusion", large, small)
    assert not torch.allclose(fusion.prefill(ids, mask)[0], lp(large.prefill(ids, mask, [BASE_ADAPTER] * 2)[0]))
    assert_cli_generated(out, calls, "patient dose", fusion, large.tokenizer, max_new_tokens=3)
    code, _, err = run_cli(monkeypatch, capsys, *args, "--model", "proxy:gamma")
    assert_one_line_error(code, err, "unknown expert 'gamma'")
    code, _, err = run_cli(monkeypatch, capsys, "generate", large_project, "x", "--alpha", "1")
    assert_one_line_error(code, err, "add --small SMALL")
    code, _, err = run_cli(monkeypatch, capsys, *args[:-4], "--small", tmp_path, "--model", "fusion")
    assert_one_line_error(code, err, "is not an expert library")


def test_card_below_threshold_is_exactly_the_large_model(pools):
    large, small = pools
    card = build_collaboration("card:alpha", large, small, threshold=1e9)
    ids, mask = _ids(large, ["patient dose trial", "the a of and to in"])
    torch.testing.assert_close(card.prefill(ids, mask)[0], large.prefill(ids, mask, [BASE_ADAPTER] * 2)[0])
    assert card.last_cards == [None, None] and card.stats()["card_fraction"] == 0.0
    params = SamplingParams(max_new_tokens=12)
    assert generate(card, large.tokenizer, ["patient dose"], params) == \
        generate(build_collaboration("proxy:alpha", large, small, alpha=0.0), large.tokenizer, ["patient dose"], params)


def test_card_is_prepended_when_relevant_and_logits_stay_honest(pools):
    large, small = pools
    card = build_collaboration("card:alpha", large, small, threshold=-1e9, card_tokens=6, query_tokens=3)
    ids, mask = _ids(large, ["patient dose trial cohort tumor", "the a of"])
    logits, _ = card.prefill(ids, mask)
    written = card.last_cards
    assert all(written) and card.stats()["card_fraction"] == 1.0
    tok = large.tokenizer
    plain = large.prefill(ids, mask, [BASE_ADAPTER] * 2)[0]
    for row, text in enumerate(written):
        prompt = ids[row][mask[row].bool()].tolist()
        carded = tok(text, add_special_tokens=False)["input_ids"] + card.separator_ids + prompt
        ref = large.prefill(torch.tensor([carded]), torch.ones(1, len(carded), dtype=torch.long), [BASE_ADAPTER])[0]
        pad = ids.shape[1] - len(prompt)
        # positions from the query's last token on see the card; earlier ones (which it was written after) do not
        torch.testing.assert_close(logits[row, pad + 2:], ref[0, -(len(prompt) - 2):])
        torch.testing.assert_close(logits[row, pad:pad + 2], plain[row, pad:pad + 2])
        assert not torch.allclose(logits[row, -1], plain[row, -1])
    # the card is written from the first 3 tokens only, so cached steps equal one prefill of everything
    ids = torch.randint(3, 250, (2, 9), generator=torch.Generator().manual_seed(6))
    assert_cached_steps_match(card, ids, torch.ones_like(ids), split=4)


def test_card_relevance_prefers_the_experts_domain(pools):
    large, small = pools
    card = build_collaboration("card:alpha", large, small)
    ids, mask = _ids(large, ["patient dose trial cohort tumor clinical therapy risk blood cells serum renal",
                             "the a of and to in is was for on that with as by at from it"])
    card.prefill(ids, mask)
    in_domain, general = card.last_relevance
    assert in_domain > general


@pytest.mark.parametrize("params, message", [
    ({"card_tokens": 0}, "bad value for 'card_tokens': Input should be greater than or equal to 1"),
    ({"query_tokens": 0}, "bad value for 'query_tokens': Input should be greater than or equal to 1"),
    ({"threshold": float("nan")}, "bad value for 'threshold': Input should be a finite number"),
    ({"alpha": 1.0}, "strategy 'card' takes no parameter(s) ['alpha']"),
])
def test_card_bad_params(pools, params, message):
    large, small = pools
    with pytest.raises(ExpertkitError) as info:
        build_collaboration("card:alpha", large, small, **params)
    assert message in str(info.value)


def test_lean_small_steps_equal_the_hf_steps(pools):
    """The collaboration's fast small-model step (compose.lean) is the HF/PEFT step, padding and growth included."""
    from expertkit.runtime.lean import LeanDecoder

    _, small = pools
    adapters = ["alpha", "alpha", BASE_ADAPTER, BASE_ADAPTER]
    ids = torch.randint(3, 250, (4, 7), generator=torch.Generator().manual_seed(8))
    mask = torch.ones_like(ids)
    mask[1, :3] = mask[3, :5] = 0
    _, hf = small.prefill(ids, mask, adapters)
    _, start = small.prefill(ids, mask, adapters)
    lean = LeanDecoder.build(small.base.model, adapters)
    state = lean.start(start.past, start.attention_mask, start.next_position, adapters, room=2)  # grows twice
    token = ids[:, -1]
    for _ in range(6):
        expected, hf = small.step(hf, token)
        got, state = lean.step(state, token)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
        token = expected.argmax(-1)
    slow = ProxyComposition(pools[0], small, "alpha", fast_small=False)
    assert generate(slow, pools[0].tokenizer, ["patient dose"], SamplingParams(max_new_tokens=12)) == \
        generate(ProxyComposition(pools[0], small, "alpha"), pools[0].tokenizer, ["patient dose"],
                 SamplingParams(max_new_tokens=12))


def test_eval_scores_collaborations_like_library_entries(monkeypatch, capsys, pools, small_project, micro_base_dir,
                                                        tmp_path):
    """`expertkit eval --small` puts proxy, fusion, defer and card rows on the scorecard, scored like any entry."""
    from expertkit.evaluate import score, test_blocks

    large, small = pools
    large_project = write_project(tmp_path, str(micro_base_dir))
    code, _, err = run_cli(monkeypatch, capsys, "eval", large_project, "--small", small_project,
                           "--out", tmp_path / "card")
    assert code == 0, err
    ppl = read_json(tmp_path / "card" / "scorecard.json")["ppl"]
    assert set(ppl) == {"base", "proxy:alpha", "defer:alpha", "card:alpha", "fusion"}
    cfg = load_config(large_project)
    direct = score([ProxyComposition(large, small, "alpha", alpha=1.0)], test_blocks(cfg, large.tokenizer),
                   cfg.evaluation.batch_size, cfg.evaluation.context_tokens)["ppl"]["proxy:alpha"]
    for domain, value in direct.items():
        assert ppl["proxy:alpha"][domain] == pytest.approx(value, rel=1e-5)
    assert ppl["proxy:alpha"] != ppl["base"]
    code, _, err = run_cli(monkeypatch, capsys, "eval", large_project, "--model", "proxy:alpha")
    assert_one_line_error(code, err, "they need a small model with experts (--small PATH)")


def test_server_sets_collaboration_parameters_per_request(served_library, small_project, pools):
    """alpha / threshold in the request body steer that request only; a model that takes none refuses them (400)."""
    import httpx

    from expertkit.serve.app import create_app
    from expertkit.serve.server import BackgroundServer, ServeOptions, build_local_service

    large, small = pools
    _, library = served_library
    service = build_local_service(library, ServeOptions(small=str(small_project), max_batch=8))
    prompt, params = "patient dose trial", SamplingParams(max_new_tokens=8)
    expected = {alpha: generate(ProxyComposition(large, small, "alpha", alpha=alpha), large.tokenizer, [prompt],
                                params)[0] for alpha in (0.0, 0.5, 1.0)}
    assert len(set(expected.values())) > 1, "alpha changes nothing here: nothing to compare"
    try:
        with BackgroundServer(create_app(service)) as server:
            def complete(**body):
                return httpx.post(server.url + "/v1/completions", timeout=60, json={
                    "prompt": prompt, "max_tokens": 8, "temperature": 0, **body})

            for alpha, text in expected.items():
                reply = complete(model="proxy:alpha", alpha=alpha)
                assert reply.status_code == 200 and reply.json()["choices"][0]["text"] == text, (alpha, reply.text)
            assert complete(model="proxy:alpha").json()["choices"][0]["text"] == expected[1.0]  # the default
            never = generate(build_collaboration("defer:alpha", large, small, threshold=1e9), large.tokenizer,
                             [prompt], params)[0]
            assert complete(model="defer:alpha", threshold=1e9).json()["choices"][0]["text"] == never
            for body, message in [({"model": "base", "alpha": 0.5}, "'base' takes no parameters"),
                                  ({"model": "proxy:alpha", "alpha": -1}, "bad value for 'alpha'"),
                                  ({"model": "proxy:alpha", "threshold": 2}, "takes no parameter(s) ['threshold']")]:
                reply = complete(**body)
                assert reply.status_code == 400 and message in reply.json()["error"]["message"], reply.text
            # Python's JSON reader takes a bare Infinity; the strategy refuses it
            reply = httpx.post(server.url + "/v1/completions", timeout=60, headers={"content-type": "application/json"},
                               content='{"model": "proxy:alpha", "prompt": "a", "alpha": Infinity}')
            assert reply.status_code == 400 and "finite number" in reply.json()["error"]["message"], reply.text
    finally:
        service.engine.stop()
