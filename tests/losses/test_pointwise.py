import math

import pytest
import torch

from twotower.losses import PointwiseBCE

LN3 = math.log(3)
# B = 2 positives, n = 2 negatives each (logits):
#   pos = [0, ln 3]      neg = [[ln 3, 0], [0, -ln 3]]
# -log sigmoid(0) = ln 2, -log sigmoid(ln 3) = -log(3/4) = ln(4/3);
# -log(1 - sigmoid(ln 3)) = ln 4, -log(1 - sigmoid(0)) = ln 2, -log(1 - sigmoid(-ln 3)) = ln(4/3).
POS = [0.0, LN3]
NEG = [[LN3, 0.0], [0.0, -LN3]]


def _inputs() -> tuple[torch.Tensor, torch.Tensor]:
    pos = torch.tensor(POS, dtype=torch.float64, requires_grad=True)
    neg = torch.tensor(NEG, dtype=torch.float64, requires_grad=True)
    return pos, neg


def test_hand_computed_value():
    pos, neg = _inputs()
    # 6 examples: ln 2 + ln(4/3) + ln 4 + ln 2 + ln 2 + ln(4/3)
    expected = (5 * math.log(2) + 2 * math.log(4 / 3)) / 6
    assert PointwiseBCE()(pos, neg).item() == pytest.approx(expected, abs=1e-12)


def test_masking_removes_the_example_from_the_mean():
    pos, neg = _inputs()
    mask = torch.tensor([[False, True], [True, True]])
    # Without the ln 4 example: (3 ln 2 + 2 ln(4/3)) / 5.
    expected = (3 * math.log(2) + 2 * math.log(4 / 3)) / 5
    assert PointwiseBCE()(pos, neg, mask).item() == pytest.approx(expected, abs=1e-12)


def test_gradient_raises_positives_and_lowers_negatives():
    pos, neg = _inputs()
    mask = torch.tensor([[True, True], [True, False]])
    PointwiseBCE()(pos, neg, mask).backward()
    # d/ds of the mean over 5 examples: (sigmoid(s) - y) / 5.
    assert pos.grad.tolist() == pytest.approx([(0.5 - 1) / 5, (0.75 - 1) / 5], abs=1e-12)
    assert neg.grad[0].tolist() == pytest.approx([0.75 / 5, 0.5 / 5], abs=1e-12)
    assert (pos.grad < 0).all() and (neg.grad[0] > 0).all()
    assert neg.grad[1, 1].item() == 0.0


def test_large_logits_stay_finite():
    pos = torch.tensor([-1000.0])
    neg = torch.tensor([[1000.0]])
    # Each example costs about 1000 (softplus(1000) = 1000).
    assert PointwiseBCE()(pos, neg).item() == pytest.approx(1000.0)


def test_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match=r"neg_logits must be \(B, n\) with B=4, got \(3, 2\)"):
        PointwiseBCE()(torch.zeros(4), torch.zeros(3, 2))
    with pytest.raises(ValueError, match="pos_logits must be"):
        PointwiseBCE()(torch.zeros(4, 1), torch.zeros(4, 2))
    with pytest.raises(ValueError, match="neg_mask must be a bool tensor"):
        PointwiseBCE()(torch.zeros(4), torch.zeros(4, 2), torch.ones(4, 2))
