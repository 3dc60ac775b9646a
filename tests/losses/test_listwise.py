import math

import pytest
import torch

from twotower.losses import ListwiseSoftmax

LN3 = math.log(3)
# B = 2 queries, n = 2 negatives each (logits):
#   pos = [0, 0]      neg = [[0, 0], [0, ln 3]]
# row 0: softmax([0, 0, 0])[0] = 1/3 -> ln 3; row 1: softmax([0, 0, ln 3])[0] = 1/5 -> ln 5
POS = [0.0, 0.0]
NEG = [[0.0, 0.0], [0.0, LN3]]


def _inputs() -> tuple[torch.Tensor, torch.Tensor]:
    pos = torch.tensor(POS, dtype=torch.float64, requires_grad=True)
    neg = torch.tensor(NEG, dtype=torch.float64, requires_grad=True)
    return pos, neg


def test_hand_computed_value():
    pos, neg = _inputs()
    expected = (math.log(3) + math.log(5)) / 2
    assert ListwiseSoftmax()(pos, neg).item() == pytest.approx(expected, abs=1e-12)


def test_masking_removes_the_negative_from_the_softmax():
    pos, neg = _inputs()
    mask = torch.tensor([[True, True], [True, False]])
    # row 1 without ln 3: softmax([0, 0])[0] = 1/2 -> ln 2
    expected = (math.log(3) + math.log(2)) / 2
    assert ListwiseSoftmax()(pos, neg, mask).item() == pytest.approx(expected, abs=1e-12)


def test_gradient_raises_positives_and_lowers_negatives():
    pos, neg = _inputs()
    ListwiseSoftmax()(pos, neg).backward()
    # d/d logit = (softmax - one_hot) / B: row 0 probs [1/3, 1/3, 1/3], row 1 [1/5, 1/5, 3/5].
    assert pos.grad.tolist() == pytest.approx([(1 / 3 - 1) / 2, (1 / 5 - 1) / 2], abs=1e-12)
    assert neg.grad[0].tolist() == pytest.approx([1 / 6, 1 / 6], abs=1e-12)
    assert neg.grad[1].tolist() == pytest.approx([0.1, 0.3], abs=1e-12)
    assert (pos.grad < 0).all() and (neg.grad > 0).all()


def test_a_row_with_every_negative_masked_costs_nothing():
    pos, neg = _inputs()
    mask = torch.tensor([[False, False], [True, True]])
    # row 0 is softmax([0])[0] = 1 -> 0; row 1 stays ln 5.
    assert ListwiseSoftmax()(pos, neg, mask).item() == pytest.approx(math.log(5) / 2, abs=1e-12)


def test_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match=r"neg_logits must be \(B, n\) with B=4, got \(3, 2\)"):
        ListwiseSoftmax()(torch.zeros(4), torch.zeros(3, 2))
