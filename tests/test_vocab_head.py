"""runtime.vocab_head: the fast few-row head product is F.linear's product, on both sides of its row threshold."""

import pytest
import torch
import torch.nn.functional as F

from expertkit.runtime.vocab_head import FEW_ROWS, vocab_logits


@pytest.mark.parametrize("rows", [1, 2, FEW_ROWS, FEW_ROWS + 1])
@pytest.mark.parametrize("with_bias", [False, True])
def test_vocab_logits_equal_linear(rows, with_bias):
    torch.manual_seed(rows)
    weight, x = torch.randn(1000, 48), torch.randn(rows, 48)
    bias = torch.randn(1000) if with_bias else None
    got = vocab_logits(x, weight, bias)
    assert got.shape == (rows, 1000)
    torch.testing.assert_close(got, F.linear(x, weight, bias), rtol=1e-5, atol=1e-4)


def test_vocab_logits_rows_take_in_place_updates():
    """The lean step adds LoRA deltas into row groups of the logits in place; that must reach the result."""
    weight, x = torch.randn(500, 16), torch.randn(3, 16)
    out = vocab_logits(x, weight)
    out[1:].addmm_(x[1:], torch.ones(16, 500))
    expected = F.linear(x, weight)
    expected[1:] += x[1:].sum(-1, keepdim=True)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-4)


def test_a_pool_gives_its_model_the_fast_head_with_the_same_logits_weights_and_copies(micro_base_dir):
    """ExpertPool turns the output layer into a VocabHead: the same Parameter (tied to the embedding where it was),
    the same logits for a decode step (few rows) and a prefill (many), and a deep copy keeps it on its own weights."""
    import copy

    from expertkit.base import load_base
    from expertkit.runtime import ExpertPool
    from expertkit.runtime.vocab_head import VocabHead

    base = load_base(str(micro_base_dir))
    head = base.model.get_output_embeddings()
    weight, tied = head.weight, head.weight is base.model.get_input_embeddings().weight
    ids = torch.randint(5, 200, (2, 12))
    with torch.no_grad():
        before = [base.model(input_ids=ids).logits, base.model(input_ids=ids[:1, :1]).logits]
    ExpertPool(base)
    assert type(base.model.get_output_embeddings()) is VocabHead and head.weight is weight
    assert (head.weight is base.model.get_input_embeddings().weight) == tied
    with torch.no_grad():
        after = [base.model(input_ids=ids).logits, base.model(input_ids=ids[:1, :1]).logits]
    for a, b in zip(before, after):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-4)
    twin = copy.deepcopy(base.model)
    with torch.no_grad():
        twin.get_output_embeddings().weight.zero_()
    assert isinstance(twin.get_output_embeddings(), VocabHead) and bool(head.weight.abs().sum() > 0)
