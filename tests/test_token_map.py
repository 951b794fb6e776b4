"""Collaborating across two vocabularies: refused without a token map, exact with one."""

import json

import pytest
import torch

from expertkit.base import load_base
from expertkit.compose.collaborate import FusionComposition, ProxyComposition, build_collaboration
from expertkit.compose.vocab import TokenMap
from expertkit.errors import ExpertkitError
from expertkit.library import Library
from expertkit.runtime import BASE_ADAPTER, ExpertPool, SamplingParams, generate
from expertkit.runtime.tokens import left_pad
from expertkit.train import train_all
from expertkit.workflow import load_project_base

from conftest import MICRO_BUILD, assert_cached_steps_match, write_project


@pytest.fixture(scope="module")
def pools(tmp_path_factory, micro_base_dir):
    """(large = the micro base, 300 tokens; small = a 16-wide base with its OWN 320-token tokenizer + 'alpha')."""
    root = tmp_path_factory.mktemp("vocab")
    build = {**MICRO_BUILD, "vocab_size": 320, "hidden_size": 16, "intermediate_size": 32}
    project = write_project(root, str(root / "small"), domains=("alpha",), base={"build": build},
                            training={"steps": 12})
    cfg, small = load_project_base(project)
    train_all(cfg, small)
    return ExpertPool(load_base(str(micro_base_dir))), ExpertPool(small, Library(cfg.library))


def test_refused_without_a_map(pools):
    large, small = pools
    with pytest.raises(ExpertkitError, match="different vocabularies.*token_map='vocab'"):
        ProxyComposition(large, small, "alpha")


def test_vocab_map_matches_strings_and_specials(pools):
    large, small = pools
    tmap = TokenMap.from_tokenizers(large, small)
    assert 0.5 < tmap.coverage < 1.0  # most BPE pieces are shared, not all
    lv, sv = large.tokenizer.convert_ids_to_tokens, small.tokenizer.convert_ids_to_tokens
    for lid in torch.nonzero(tmap.mapped).view(-1).tolist():
        assert lv(lid) == sv(int(tmap.large_to_small[lid]))
    assert int(tmap.large_to_small[large.tokenizer.eos_token_id]) == small.tokenizer.eos_token_id


def test_proxy_with_a_map_is_the_mapped_arithmetic(pools):
    large, small = pools
    proxy = ProxyComposition(large, small, "alpha", alpha=0.6, token_map="vocab")
    ids, mask = left_pad(large.tokenizer, ["patient dose trial", "the a of and to in"])
    combined, _ = proxy.prefill(ids, mask)
    tmap = proxy.token_map
    lp = lambda logits: torch.log_softmax(logits.float(), -1)  # noqa: E731
    small_ids = tmap.to_small(ids)
    expert = tmap.to_large(lp(small.prefill(small_ids, mask, ["alpha"] * 2)[0]))
    base = tmap.to_large(lp(small.prefill(small_ids, mask, [BASE_ADAPTER] * 2)[0]))
    expected = tmap.mask_unmapped(lp(large.prefill(ids, mask, [BASE_ADAPTER] * 2)[0]) + 0.6 * (expert - base))
    assert combined.shape[-1] == large.base.model.config.vocab_size
    torch.testing.assert_close(combined, expected, rtol=1e-5, atol=1e-5)
    assert torch.isinf(combined[..., ~tmap.mapped]).all() and torch.isfinite(combined[..., tmap.mapped]).all()


def test_cached_steps_and_generation_with_a_map(pools):
    large, small = pools
    ids = torch.randint(3, 250, (2, 9), generator=torch.Generator().manual_seed(7))
    for composition in (ProxyComposition(large, small, "alpha", token_map="vocab"),
                        FusionComposition(large, small, ["alpha", BASE_ADAPTER], token_map="vocab"),
                        build_collaboration("defer:alpha", large, small, token_map="vocab", threshold=2.0)):
        assert_cached_steps_match(composition, ids, torch.ones_like(ids), split=4)
    proxy = ProxyComposition(large, small, "alpha", token_map="vocab")
    text = generate(proxy, large.tokenizer, ["patient dose"], SamplingParams(max_new_tokens=10, temperature=1.0))[0]
    new_ids = large.tokenizer(text, add_special_tokens=False)["input_ids"]
    assert all(bool(proxy.token_map.mapped[i]) for i in new_ids)


def test_json_map(pools, tmp_path):
    large, small = pools
    tmap = TokenMap.from_tokenizers(large, small)
    pairs = {str(i): int(tmap.large_to_small[i]) for i in torch.nonzero(tmap.mapped).view(-1).tolist()}
    path = tmp_path / "map.json"
    path.write_text(json.dumps(pairs))
    proxy = ProxyComposition(large, small, "alpha", token_map=path)
    assert torch.equal(proxy.token_map.large_to_small, tmap.large_to_small)
    path.write_text(json.dumps({"0": 10_000}))
    with pytest.raises(ExpertkitError, match="outside the vocabularies"):
        ProxyComposition(large, small, "alpha", token_map=path)
    path.write_text("[1, 2]")
    with pytest.raises(ExpertkitError, match="must be a JSON object"):
        ProxyComposition(large, small, "alpha", token_map=path)
    with pytest.raises(ExpertkitError, match="token map file not found"):
        ProxyComposition(large, small, "alpha", token_map=tmp_path / "nope.json")


def test_card_needs_no_map(pools):
    large, small = pools
    card = build_collaboration("card:alpha", large, small, threshold=-1e9, card_tokens=4)
    ids, mask = left_pad(large.tokenizer, ["patient dose trial"])
    logits, _ = card.prefill(ids, mask)
    assert card.last_cards[0] and logits.shape == (1, ids.shape[1], large.base.model.config.vocab_size)


def test_cli_token_map(monkeypatch, capsys, pools, micro_base_dir, tmp_path):
    from test_cli import assert_cli_generated, assert_one_line_error, capture_generations, run_cli

    large, small = pools
    args = ("generate", write_project(tmp_path, str(micro_base_dir)), "patient dose", "--small", small.library.root,
            "--model", "proxy:alpha", "--max-tokens", "4")
    code, _, err = run_cli(monkeypatch, capsys, *args)
    assert_one_line_error(code, err, "different vocabularies")
    calls = capture_generations(monkeypatch)
    code, out, err = run_cli(monkeypatch, capsys, *args, "--token-map", "vocab")
    assert code == 0, err
    proxy = ProxyComposition(large, small, "alpha", token_map="vocab")
    assert_cli_generated(out, calls, "patient dose", proxy, large.tokenizer, max_new_tokens=4)
