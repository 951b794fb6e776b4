"""Collaborating across two vocabularies: refused without a token map, exact with one."""

import json

import pytest
import torch

from expertkit.compose.collaborate import FusionComposition, ProxyComposition, build_collaboration
from expertkit.compose.vocab import TextAlignment, TokenMap
from expertkit.errors import ExpertkitError
from expertkit.runtime import BASE_ADAPTER, SamplingParams, generate
from expertkit.runtime.tokens import left_pad

from conftest import assert_cached_steps_match, write_project


def test_text_alignment_is_the_default_across_vocabularies(two_vocabularies):
    large, small = two_vocabularies
    assert isinstance(ProxyComposition(large, small, "alpha").token_map, TextAlignment)
    assert isinstance(ProxyComposition(large, small, "alpha", token_map="vocab").token_map, TokenMap)


def test_vocab_map_matches_strings_and_specials(two_vocabularies):
    large, small = two_vocabularies
    tmap = TokenMap.from_tokenizers(large, small)
    assert 0.5 < tmap.coverage < 1.0  # most BPE pieces are shared, not all
    lv, sv = large.tokenizer.convert_ids_to_tokens, small.tokenizer.convert_ids_to_tokens
    for lid in torch.nonzero(tmap.mapped).view(-1).tolist():
        assert lv(lid) == sv(int(tmap.large_to_small[lid]))
    assert int(tmap.large_to_small[large.tokenizer.eos_token_id]) == small.tokenizer.eos_token_id


def test_proxy_with_a_map_is_the_mapped_arithmetic(two_vocabularies):
    large, small = two_vocabularies
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


def test_cached_steps_and_generation_with_a_map(two_vocabularies):
    large, small = two_vocabularies
    ids = torch.randint(3, 250, (2, 9), generator=torch.Generator().manual_seed(7))
    for composition in (ProxyComposition(large, small, "alpha", token_map="vocab"),
                        FusionComposition(large, small, ["alpha", BASE_ADAPTER], token_map="vocab"),
                        build_collaboration("defer:alpha", large, small, token_map="vocab", threshold=2.0)):
        assert_cached_steps_match(composition, ids, torch.ones_like(ids), split=4)
    proxy = ProxyComposition(large, small, "alpha", token_map="vocab")
    text = generate(proxy, large.tokenizer, ["patient dose"], SamplingParams(max_new_tokens=10, temperature=1.0))[0]
    new_ids = large.tokenizer(text, add_special_tokens=False)["input_ids"]
    assert all(bool(proxy.token_map.mapped[i]) for i in new_ids)


def test_json_map(two_vocabularies, tmp_path):
    large, small = two_vocabularies
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


def test_card_needs_no_map(two_vocabularies):
    large, small = two_vocabularies
    card = build_collaboration("card:alpha", large, small, threshold=-1e9, card_tokens=4)
    ids, mask = left_pad(large.tokenizer, ["patient dose trial"])
    logits, _ = card.prefill(ids, mask)
    assert card.last_cards[0] and logits.shape == (1, ids.shape[1], large.base.model.config.vocab_size)


def test_cli_token_map(monkeypatch, capsys, two_vocabularies, micro_base_dir, tmp_path):
    from test_cli import assert_cli_generated, assert_one_line_error, capture_generations, run_cli

    large, small = two_vocabularies
    args = ("generate", write_project(tmp_path, str(micro_base_dir)), "patient dose", "--small", small.library.root,
            "--model", "proxy:alpha", "--max-tokens", "4")
    code, _, err = run_cli(monkeypatch, capsys, *args, "--token-map", tmp_path / "missing.json")
    assert_one_line_error(code, err, "token map file not found")
    calls = capture_generations(monkeypatch)
    code, out, err = run_cli(monkeypatch, capsys, *args, "--token-map", "vocab")
    assert code == 0, err
    proxy = ProxyComposition(large, small, "alpha", token_map="vocab")
    assert_cli_generated(out, calls, "patient dose", proxy, large.tokenizer, max_new_tokens=4)
