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
