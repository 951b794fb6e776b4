"""Collaborating across vocabularies by text: the small model reads the large model's text in its own tokens."""

import pytest
import torch

from expertkit.base import load_base
from expertkit.compose.collaborate import ProxyComposition, build_collaboration, check_collaborators
from expertkit.compose.vocab import TextAlignment, scores_by_index, token_texts
from expertkit.errors import ExpertkitError
from expertkit.runtime import BASE_ADAPTER, ExpertPool, SamplingParams, generate
from expertkit.runtime.tokens import left_pad

from conftest import assert_cached_steps_match


def small_row(alignment: TextAlignment, large_ids: list[int]) -> list[int]:
    """What the small model reads for these large tokens: their chunks, one after another."""
    row = [t for lid in large_ids for t in alignment.chunks[lid]]
    return row or list(alignment.small_start)


def test_token_texts_rebuild_the_text(two_vocabularies):
    large, _ = two_vocabularies
    texts = token_texts(large.tokenizer)
    ids = large.tokenizer("patient dose of the trial, 12 mg.", add_special_tokens=False)["input_ids"]
    assert "".join(texts[i] for i in ids) == "patient dose of the trial, 12 mg."


def test_every_large_token_is_read_as_its_text(two_vocabularies):
    large, small = two_vocabularies
    alignment = TextAlignment.between(large, small)
    texts = token_texts(large.tokenizer)
    whole = torch.tensor([bool(t) and "\ufffd" not in t for t in texts])  # not a lone byte of a UTF-8 character
    whole[large.tokenizer.all_special_ids] = False
    assert bool(alignment.aligned[:len(texts)][whole].all())  # a byte-level tokenizer spells any whole text
    ids = large.tokenizer("patient dose the", add_special_tokens=False)["input_ids"]
    assert small.tokenizer.decode(small_row(alignment, ids)) == "patient dose the"
    assert alignment.chunks[large.tokenizer.eos_token_id] == [small.tokenizer.eos_token_id]


def test_proxy_is_the_arithmetic_on_each_candidates_first_small_token(two_vocabularies):
    large, small = two_vocabularies
    proxy = ProxyComposition(large, small, "alpha", alpha=0.7)
    alignment = proxy.token_map
    ids, mask = left_pad(large.tokenizer, ["patient dose trial", "the a of and to in is"])
    combined = proxy.prefill(ids, mask)[0].cpu()  # the expectation is built on the CPU, the models run anywhere
    lp = lambda logits: torch.log_softmax(logits.float().cpu(), -1)  # noqa: E731
    large_lp = lp(large.prefill(ids, mask, [BASE_ADAPTER] * 2)[0])
    # each large token's first small token, from the small tokenizer itself (specials by role)
    first = torch.tensor([(small.tokenizer(t, add_special_tokens=False)["input_ids"] or [0])[0]
                          for t in token_texts(large.tokenizer)])
    first[large.tokenizer.eos_token_id] = small.tokenizer.eos_token_id
    for r in range(2):
        real = ids[r][mask[r].bool()].tolist()
        offset = ids.shape[1] - len(real)
        for j in range(len(real)):  # position j: the small model has read the chunks of tokens 0..j
            prefix = torch.tensor([small_row(alignment, real[:j + 1])])
            ones = torch.ones_like(prefix)
            expert = lp(small.prefill(prefix, ones, ["alpha"])[0][0, -1])[first]
            base = lp(small.prefill(prefix, ones, [BASE_ADAPTER])[0][0, -1])[first]
            shift = torch.where(alignment.aligned, expert - base, torch.zeros_like(expert))
            torch.testing.assert_close(combined[r, offset + j], large_lp[r, offset + j] + 0.7 * shift,
                                       rtol=1e-4, atol=1e-4)


def test_steps_match_prefill_and_rows_match_alone(two_vocabularies):
    large, small = two_vocabularies
    ids = torch.randint(3, 290, (3, 10), generator=torch.Generator().manual_seed(3))
    chunks = TextAlignment.between(large, small).chunks
    by_length = {n: next(i for i, c in enumerate(chunks) if len(c) == n) for n in (0, 1, 2)}
    ids[:, 6] = torch.tensor([by_length[2], by_length[1], by_length[0]])  # one step, three chunk lengths
    for spec, params in (("proxy:alpha", {}), ("fusion", {}), ("defer:alpha", {"threshold": 2.0})):
        composition = build_collaboration(spec, large, small, token_map="text", **params)
        assert_cached_steps_match(composition, ids, torch.ones_like(ids), split=4)  # rows of different text
        assert_cached_steps_match(composition, ids[:1], torch.ones_like(ids[:1]), split=4)  # one row: lean steps
    proxy = ProxyComposition(large, small, "alpha")
    prompts = ["patient dose", "the a of and to in is was", "renal"]
    greedy = SamplingParams(max_new_tokens=8)
    together = generate(proxy, large.tokenizer, prompts, greedy)
    alone = [generate(proxy, large.tokenizer, [p], greedy)[0] for p in prompts]
    assert together == alone and all(together)


def test_card_reads_text_without_a_map_and_refuses_a_token_map(two_vocabularies):
    large, small = two_vocabularies
    assert build_collaboration("card:alpha", large, small, token_map="text").name == "card:alpha"
    with pytest.raises(ExpertkitError, match="card passes text"):
        build_collaboration("card:alpha", large, small, token_map="vocab")


def test_a_small_tokenizer_that_cannot_spell_the_large_text_is_refused(two_vocabularies):
    from types import SimpleNamespace

    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    large, _ = two_vocabularies
    words = Tokenizer(models.WordLevel({"[UNK]": 0, "the": 1, "</s>": 2}, unk_token="[UNK]"))
    words.pre_tokenizer = pre_tokenizers.Whitespace()
    word_level = PreTrainedTokenizerFast(tokenizer_object=words, unk_token="[UNK]", eos_token="</s>")
    identity = {"tokenizer_hash": "word-level"}
    base = SimpleNamespace(name="word-level-small", identity=lambda: identity)
    small = SimpleNamespace(tokenizer=word_level, base=base)
    with pytest.raises(ExpertkitError, match="'word-level-small' cannot be aligned.*spells only"):
        TextAlignment.between(large, small)


def test_a_companion_of_another_teacher_is_refused(two_vocabularies, tmp_path, micro_base_dir):
    from expertkit.config import DistillConfig
    from expertkit.distill import distill

    from conftest import write_corpus

    large, small = two_vocabularies
    text = write_corpus(tmp_path / "text", "general", n=200)
    out = tmp_path / "companion"
    distill(str(micro_base_dir), text, out, DistillConfig(num_layers=1, hidden_size=16, intermediate_size=32,
                                                          steps=2, batch_size=2, block_size=32))
    companion = ExpertPool(load_base(str(out)))
    assert check_collaborators(large, companion, []) is None  # its own teacher: one vocabulary
    with pytest.raises(ExpertkitError, match="was distilled from .* not from the large model"):
        check_collaborators(small, companion, [])


def test_served_across_vocabularies_with_the_alignment_chosen_per_request(two_vocabularies, served_library):
    import httpx
    import openai

    from expertkit.serve.app import create_app
    from expertkit.serve.server import BackgroundServer, ServeOptions, build_local_service

    _, small = two_vocabularies
    _, library = served_library
    service = build_local_service(library, ServeOptions(small=str(small.library.root), max_batch=4))
    proxy = service.engine.compositions["proxy:alpha"]
    assert isinstance(proxy.token_map, TextAlignment)  # the default across vocabularies
    greedy = SamplingParams(max_new_tokens=6)
    with BackgroundServer(create_app(service)) as srv:
        c = openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0)
        for token_map in ("text", "vocab"):
            reply = c.completions.create(model="proxy:alpha", prompt="patient dose", max_tokens=6, temperature=0,
                                         extra_body={"token_map": token_map})
            expected = generate(proxy.configured(token_map=token_map), service.tokenizer, ["patient dose"], greedy)
            assert reply.choices[0].text == expected[0], token_map
        for model, token_map, fragment in (("proxy:alpha", "bytes", "token_map"), ("alpha", "vocab", "no parameters")):
            bad = httpx.post(srv.url + "/v1/completions", json={"model": model, "prompt": "a", "max_tokens": 2,
                                                                 "token_map": token_map})
            assert bad.status_code == 400 and fragment in bad.text, bad.text


def test_token_map_without_a_small_model_is_one_clear_line(monkeypatch, capsys, served_library, tmp_path):
    from test_cli import assert_one_line_error, run_cli

    from conftest import write_project

    cfg, library = served_library
    code, _, err = run_cli(monkeypatch, capsys, "eval", write_project(tmp_path, cfg.base.path), "--token-map", "text")
    assert_one_line_error(code, err, "--token-map aligns a small model's vocabulary", "--small")
    code, _, err = run_cli(monkeypatch, capsys, "serve", library, "--token-map", "vocab", "--port", "0")
    assert_one_line_error(code, err, "--token-map aligns a small model's vocabulary", "--small")


def test_extend_reads_rows_of_different_lengths_as_one_prefill_would(two_vocabularies):
    """ExpertPool.extend: a row with fewer new tokens is left-padded; its real tokens keep their positions."""
    large, _ = two_vocabularies
    ids = torch.randint(3, 250, (2, 8), generator=torch.Generator().manual_seed(1))
    _, state = large.prefill(ids[:, :5], torch.ones_like(ids[:, :5]), [BASE_ADAPTER] * 2)
    new = torch.stack([ids[0, 5:], torch.cat([ids[1, :1] * 0, ids[1, 6:]])])  # row 1 skips token 5 (a pad)
    logits, state = large.extend(state, new, torch.tensor([[1, 1, 1], [0, 1, 1]]))
    assert state.next_position.tolist() == [8, 7]
    for row, expected_ids in ((0, ids[0]), (1, torch.cat([ids[1, :5], ids[1, 6:]]))):
        expected, _ = large.prefill(expected_ids[None], torch.ones_like(expected_ids[None]), [BASE_ADAPTER])
        # exact to 1e-6: this barely trained micro model moves its logits by only ~5e-5 for a token one
        # position off, so a looser tolerance would not see a wrong position
        torch.testing.assert_close(logits[row, -1], expected[0, -1], rtol=0, atol=1e-6)


def test_scores_by_index_equals_index_select_on_the_last_dim():
    scores = torch.randn(2, 3, 5, 40)
    index = torch.randint(0, 40, (70,))
    for view in (scores, scores[:, :, 1:], scores.transpose(1, 2)):  # contiguous or not
        assert torch.equal(scores_by_index(view, index), view.index_select(-1, index))
