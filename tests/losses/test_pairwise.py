import math

import pytest
import torch

from twotower.losses import TripletHinge, TripletLogistic

# B = 2 queries, n = 2 negatives each (cosines):
#   pos_cos = [0.9, 0.2]      neg_cos = [[0.3, 0.6], [0.5, -0.4]]
# neg - pos = [[-0.6, -0.3], [0.3, -0.6]]
POS = [0.9, 0.2]
NEG = [[0.3, 0.6], [0.5, -0.4]]


def _inputs() -> tuple[torch.Tensor, torch.Tensor]:
    pos = torch.tensor(POS, dtype=torch.float64, requires_grad=True)
    neg = torch.tensor(NEG, dtype=torch.float64, requires_grad=True)
    return pos, neg


def test_hinge_hand_computed_value():
    pos, neg = _inputs()
    # margin 0.5: max(0, [[-0.1, 0.2], [0.8, -0.1]]) = [[0, 0.2], [0.8, 0]] -> 1.0 / 4
    assert TripletHinge(margin=0.5)(pos, neg).item() == pytest.approx(0.25, abs=1e-12)


def test_hinge_masking_removes_the_triplet():
    pos, neg = _inputs()
    mask = torch.tensor([[True, True], [False, True]])
    # Without the 0.8 triplet: (0 + 0.2 + 0) / 3
    assert TripletHinge(margin=0.5)(pos, neg, mask).item() == pytest.approx(0.2 / 3, abs=1e-12)


def test_hinge_gradient_only_from_violated_triplets():
    pos, neg = _inputs()
    TripletHinge(margin=0.5)(pos, neg).backward()
    # Active triplets (0, 1) and (1, 0), each weighted 1/4.
    assert pos.grad.tolist() == [-0.25, -0.25]
    assert neg.grad.tolist() == [[0.0, 0.25], [0.25, 0.0]]


def test_hinge_with_zero_margin_and_negative_margin_rejected():
    pos, neg = _inputs()
    # margin 0: max(0, [[-0.6, -0.3], [0.3, -0.6]]) -> 0.3 / 4
    assert TripletHinge(margin=0.0)(pos, neg).item() == pytest.approx(0.075, abs=1e-12)
    with pytest.raises(ValueError, match="margin must be >= 0"):
        TripletHinge(margin=-0.1)


def test_logistic_hand_computed_value():
    pos, neg = _inputs()
    # sigma 5: sigma * (neg - pos) = [[-3, -1.5], [1.5, -3]]
    expected = (2 * math.log1p(math.exp(-3)) + math.log1p(math.exp(-1.5))) / 4
    expected += math.log1p(math.exp(1.5)) / 4
    assert TripletLogistic(sigma=5.0)(pos, neg).item() == pytest.approx(expected, abs=1e-12)


def test_logistic_masking_removes_the_triplet():
    pos, neg = _inputs()
    mask = torch.tensor([[False, True], [True, False]])
    # The two kept triplets have sigma * gap = -1.5 and 1.5.
    expected = (math.log1p(math.exp(-1.5)) + math.log1p(math.exp(1.5))) / 2
    assert TripletLogistic(sigma=5.0)(pos, neg, mask).item() == pytest.approx(expected, abs=1e-12)


def test_logistic_gradient_raises_positives_and_lowers_negatives():
    pos, neg = _inputs()
    TripletLogistic(sigma=5.0)(pos, neg).backward()
    # d/d neg = sigma * sigmoid(sigma * gap) / 4; d/d pos = minus the row's sum.
    sigmoid = [[1 / (1 + math.exp(3)), 1 / (1 + math.exp(1.5))]]
    sigmoid.append([1 / (1 + math.exp(-1.5)), 1 / (1 + math.exp(3))])
    expected_neg = [[5 * s / 4 for s in row] for row in sigmoid]
    assert neg.grad.tolist()[0] == pytest.approx(expected_neg[0], abs=1e-12)
    assert neg.grad.tolist()[1] == pytest.approx(expected_neg[1], abs=1e-12)
    assert pos.grad.tolist() == pytest.approx([-sum(r) for r in expected_neg], abs=1e-12)
    assert (pos.grad < 0).all() and (neg.grad > 0).all()


def test_logistic_is_stable_for_a_large_gap_and_rejects_bad_sigma():
    # sigma * gap = 5 * 200 = 1000: log(1 + e^1000) = 1000 to double precision.
    loss = TripletLogistic(sigma=5.0)(torch.tensor([-100.0]), torch.tensor([[100.0]]))
    assert loss.item() == pytest.approx(1000.0)
    for sigma in (0.0, -1.0):
        with pytest.raises(ValueError, match="sigma must be > 0"):
            TripletLogistic(sigma=sigma)


@pytest.mark.parametrize("loss", [TripletHinge(), TripletLogistic()])
def test_all_masked_gives_an_attached_zero(loss):
    pos, neg = _inputs()
    value = loss(pos, neg, torch.zeros(2, 2, dtype=torch.bool))
    assert value.item() == 0.0
    assert value.grad_fn is not None
    value.backward()
    assert pos.grad.tolist() == [0.0, 0.0]
    assert neg.grad.tolist() == [[0.0, 0.0], [0.0, 0.0]]


def test_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match=r"neg_cos must be \(B, n\) with B=4, got \(3, 2\)"):
        TripletHinge()(torch.zeros(4), torch.zeros(3, 2))
    with pytest.raises(ValueError, match=r"neg_mask must be a bool tensor of shape \(4, 2\)"):
        TripletLogistic()(torch.zeros(4), torch.zeros(4, 2), torch.ones(4, 3, dtype=torch.bool))
