import math

import pytest
import torch

from expertkit.compose import build_compositions, register
from expertkit.errors import ExpertkitError
from expertkit.evaluate import score
from expertkit.runtime import BASE_ADAPTER, ExpertPool, SamplingParams, generate
from expertkit.runtime.tokens import left_pad

from conftest import assert_cached_steps_match


@pytest.fixture
def pool(trained):
    cfg, base, library = trained
    return ExpertPool(base, library)


def test_every_library_entry_is_a_composition(pool):
    assert [c.name for c in build_compositions(pool)] == ["base", "alpha", "beta"]
    with pytest.raises(ExpertkitError, match=r"unknown composition\(s\) \['gamma'\]"):
        build_compositions(pool, ["gamma"])


def test_mixed_batch_equals_one_at_a_time(pool):
    ids = torch.randint(3, 200, (3, 12), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    adapters = ["alpha", "beta", BASE_ADAPTER]
    mixed, _ = pool.prefill(ids, mask, adapters)
    for i, a in enumerate(adapters):
        alone, _ = pool.prefill(ids[i:i + 1], mask[i:i + 1], [a])
        torch.testing.assert_close(mixed[i], alone[0], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(mixed[0], pool.prefill(ids[:1], mask[:1], [BASE_ADAPTER])[0][0])


def test_keep_last_gives_the_last_columns_of_every_position(served_library):
    """What scoring asks for a continuation: the last k positions' logits, as the full prefill has them."""
    from expertkit.base import load_base
    from expertkit.library import Library

    library = Library(served_library[1])
    pool = ExpertPool(load_base(library.base_identity()["name"]), library)
    ids = torch.randint(3, 200, (3, 12), generator=torch.Generator().manual_seed(2))
    ids[0, :4] = 0
    mask = (ids != 0).long()
    compositions = build_compositions(pool)
    assert "router-lexical" in [c.name for c in compositions]
    for composition in compositions:
        full, _ = composition.prefill(ids, mask)
        last, _ = composition.prefill(ids, mask, keep_last=5)
        assert last.shape[1] == 5, composition.name
        torch.testing.assert_close(last, full[:, -5:], rtol=1e-5, atol=1e-5, msg=composition.name)


def test_cached_steps_equal_recomputing_the_sequence(pool):
    alpha = build_compositions(pool, ["alpha"])[0]
    ids = torch.randint(3, 200, (2, 10), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    assert_cached_steps_match(alpha, ids, mask, split=6)


def test_left_padding_does_not_change_a_row(pool, trained):
    _, base, _ = trained
    alpha = build_compositions(pool, ["alpha"])[0]
    prompts = ["patient dose trial", "the a of and to in is was for on that"]
    ids, mask = left_pad(base.tokenizer, prompts)
    batched, _ = alpha.prefill(ids, mask)
    short_ids, short_mask = left_pad(base.tokenizer, prompts[:1])
    alone, _ = alpha.prefill(short_ids, short_mask)
    torch.testing.assert_close(batched[0, -1], alone[0, -1], rtol=1e-4, atol=1e-4)


def test_generation_is_deterministic_and_honours_stop(pool, trained):
    _, base, _ = trained
    alpha = build_compositions(pool, ["alpha"])[0]
    greedy = SamplingParams(max_new_tokens=12)
    assert generate(alpha, base.tokenizer, ["patient"], greedy) == generate(alpha, base.tokenizer, ["patient"], greedy)
    sampled = SamplingParams(max_new_tokens=12, temperature=1.0, top_p=0.9, seed=7)
    a = generate(alpha, base.tokenizer, ["patient", "the"], sampled)
    assert a == generate(alpha, base.tokenizer, ["patient", "the"], sampled)
    counted = _StepCounter(alpha)
    full = generate(counted, base.tokenizer, ["patient"], SamplingParams(max_new_tokens=12, temperature=1.0, seed=4))[0]
    steps_without_stop = counted.steps
    # a stop string strictly inside the continuation (text before and after it), first seen there
    inside = [k for k in range(1, len(full) - 2) if _plain(full[k:k + 2]) and full.index(full[k:k + 2]) == k]
    assert inside, f"the sampled continuation {full!r} has no stop string to test with; pick another seed"
    k = inside[0]
    stop = full[k:k + 2]
    counted.steps = 0
    cut = generate(counted, base.tokenizer, ["patient"],
                   SamplingParams(max_new_tokens=12, temperature=1.0, seed=4, stop=(stop,)))[0]
    assert cut == full[:k] and stop not in cut, (full, stop, cut)
    assert counted.steps < steps_without_stop, "decoding went on past the stop string"


def _plain(text: str) -> bool:
    """Printable ASCII: never half of a multi-byte character that a longer decode would complete."""
    return text.isascii() and text.isprintable()


class _StepCounter:
    """A composition that counts its decode steps (to see generation end at a stop string)."""

    def __init__(self, inner):
        self.inner, self.steps = inner, 0

    def prefill(self, input_ids, attention_mask, keep_last=None):
        return self.inner.prefill(input_ids, attention_mask, keep_last)

    def step(self, state, next_ids):
        self.steps += 1
        return self.inner.step(state, next_ids)


def test_context_overflow_is_a_clear_error(pool, trained):
    _, base, _ = trained
    alpha = build_compositions(pool, ["alpha"])[0]
    with pytest.raises(ExpertkitError, match="exceeds the model's context of 64"):
        generate(alpha, base.tokenizer, ["patient " * 60], SamplingParams(max_new_tokens=8), context_length=64)


def test_scorecard_perplexity_matches_transformers_loss(pool, trained):
    cfg, base, _ = trained
    ids = torch.randint(3, 200, (4, 16), generator=torch.Generator().manual_seed(2))
    from expertkit.data import Blocks

    blocks = Blocks(ids, ids.clone(), torch.ones_like(ids))
    card = score(build_compositions(pool, ["base"]), {"x": blocks}, batch_size=3)
    from transformers import AutoModelForCausalLM

    with torch.no_grad():
        loss = AutoModelForCausalLM.from_pretrained(cfg.base.path)(input_ids=ids, labels=ids).loss
    assert math.isclose(card["ppl"]["base"]["x"], math.exp(float(loss)), rel_tol=1e-4)


def test_registering_a_kind_twice_is_refused():
    with pytest.raises(ValueError, match="registered twice"):
        register("expert")(lambda pool, entry: None)


def test_loading_adapters_hands_the_freed_memory_back(trained, monkeypatch):
    """The files' temporary copies are returned to the OS after a load (a server's resident memory is then the
    adapters themselves), and only when something was loaded."""
    import platform

    import expertkit.runtime.pool as pool_module
    from expertkit.runtime.memory import _malloc_trim

    if platform.system() == "Linux" and platform.libc_ver()[0] == "glibc":
        assert _malloc_trim() is not None
    releases = []
    monkeypatch.setattr(pool_module, "release_freed_memory", lambda: releases.append(1))
    _, base, library = trained
    pool = ExpertPool(base, library)
    assert releases == [1]
    pool.ensure(["alpha", "beta"])  # already held: nothing loaded
    assert releases == [1]
