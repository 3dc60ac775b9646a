"""Per-row weights in every loss: each equals its weighted hand computation, weights of
one change nothing, and a weight of 2 counts a row twice."""

from __future__ import annotations

import math

import pytest
import torch

from twotower.losses import (
    ListwiseSoftmax,
    PointwiseBCE,
    SampledSoftmax,
    TripletHinge,
    TripletLogistic,
)

POS = torch.tensor([0.3, -0.2, 0.9])
NEG = torch.tensor([[0.1, 0.5, -0.4, 0.2], [0.0, -0.3, 0.8, 0.6], [0.4, 0.4, -0.9, 0.1]])
KEEP = torch.tensor(
    [[True, True, False, True], [True, True, True, True], [False, True, True, False]]
)
WEIGHTS = torch.tensor([2.0, 0.5, 1.0])


def bce(logit: float, label: float) -> float:
    p = 1 / (1 + math.exp(-logit))
    return -(label * math.log(p) + (1 - label) * math.log(1 - p))


def kept(b: int) -> list[int]:
    return [j for j in range(4) if KEEP[b, j]]


def by_hand(name: str) -> float:
    w = WEIGHTS.tolist()
    pos, neg = POS.tolist(), NEG.tolist()
    if name == "pointwise":
        total = sum(
            w[b] * (bce(pos[b], 1) + sum(bce(neg[b][j], 0) for j in kept(b))) for b in range(3)
        )
        return total / sum(w[b] * (1 + len(kept(b))) for b in range(3))
    if name in ("hinge", "logistic"):
        term = (
            (lambda g: max(0.0, 0.5 + g))
            if name == "hinge"
            else (lambda g: math.log(1 + math.exp(10 * g)))
        )
        total = sum(w[b] * term(neg[b][j] - pos[b]) for b in range(3) for j in kept(b))
        return total / sum(w[b] * len(kept(b)) for b in range(3))
    # listwise: the positive first, then the kept negatives
    rows = []
    for b in range(3):
        logits = [pos[b]] + [neg[b][j] for j in kept(b)]
        rows.append(-logits[0] + math.log(sum(math.exp(x) for x in logits)))
    return sum(w[b] * rows[b] for b in range(3)) / sum(w)


LOSSES = {
    "pointwise": PointwiseBCE(),
    "hinge": TripletHinge(margin=0.5),
    "logistic": TripletLogistic(sigma=10.0),
    "listwise": ListwiseSoftmax(),
}


@pytest.mark.parametrize("name", LOSSES)
def test_each_row_negative_loss_equals_its_weighted_hand_computation(name):
    loss = LOSSES[name](POS, NEG, KEEP, WEIGHTS)
    assert loss.item() == pytest.approx(by_hand(name), rel=1e-6)
    unweighted = LOSSES[name](POS, NEG, KEEP)
    assert LOSSES[name](POS, NEG, KEEP, torch.ones(3)).item() == pytest.approx(unweighted.item())


@pytest.mark.parametrize("name", LOSSES)
def test_a_weight_of_two_counts_a_row_twice(name):
    doubled = LOSSES[name](POS, NEG, KEEP, torch.tensor([2.0, 1.0, 1.0]))
    twice = LOSSES[name](
        torch.cat([POS[:1], POS]), torch.cat([NEG[:1], NEG]), torch.cat([KEEP[:1], KEEP])
    )
    assert doubled.item() == pytest.approx(twice.item(), rel=1e-6)


def test_sampled_softmax_weights_rows_by_hand():
    logits = torch.tensor([[2.0, 0.5, -1.0], [0.1, 0.2, 0.3], [1.0, -1.0, 0.0]])
    labels = torch.tensor([0, 2, 1])
    rows = [
        -logits[b, labels[b]].item() + math.log(sum(math.exp(x) for x in logits[b].tolist()))
        for b in range(3)
    ]
    expected = (
        sum(w * r for w, r in zip(WEIGHTS.tolist(), rows, strict=True)) / WEIGHTS.sum().item()
    )
    assert SampledSoftmax()(logits, labels, WEIGHTS).item() == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("name", LOSSES)
def test_bad_weights_are_refused(name):
    with pytest.raises(ValueError, match=r"weights must be \(3,\)"):
        LOSSES[name](POS, NEG, KEEP, torch.ones(2))
    with pytest.raises(ValueError, match="finite and >= 0"):
        LOSSES[name](POS, NEG, KEEP, torch.tensor([1.0, -1.0, 1.0]))
