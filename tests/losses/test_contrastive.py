"""ViewContrastiveLoss: a hand-computed case, identical views' closed form, the
gradient's direction, the empty batch and shape checks."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from twotower.losses import ViewContrastiveLoss


def test_three_items_against_the_hand_computed_value():
    # cosines of first view i (rows) against second view j (columns), tau = 0.5:
    #   [[1, 0, 0],      item 0: its own view, the others orthogonal
    #    [0, 1, 1],      item 1: item 2's second view as close as its own
    #    [1, 0, 0]]      item 2: its own view orthogonal, item 0's identical
    # loss = mean(-2 + log(e^2 + 2), -2 + log(1 + 2 e^2), 0 + log(e^2 + 2))
    first = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]], dtype=torch.float64)
    second = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 1.0]], dtype=torch.float64)
    e2 = math.exp(2.0)
    by_hand = (2 * math.log(e2 + 2) + math.log(1 + 2 * e2) - 4) / 3
    assert by_hand == pytest.approx(1.079238, abs=1e-6)
    loss = ViewContrastiveLoss(temperature=0.5)
    assert loss(first, second).item() == pytest.approx(by_hand, rel=1e-12)
    # cosines: the views' lengths do not count
    assert loss(3 * first, 0.5 * second).item() == pytest.approx(by_hand, rel=1e-12)


def test_against_numpy_on_random_views():
    rng = np.random.default_rng(0)
    first, second = rng.normal(size=(5, 4)), rng.normal(size=(5, 4))
    tau = 0.2
    a = first / np.linalg.norm(first, axis=1, keepdims=True)
    b = second / np.linalg.norm(second, axis=1, keepdims=True)
    logits = a @ b.T / tau
    expected = np.mean(np.log(np.exp(logits).sum(axis=1)) - np.diag(logits))
    value = ViewContrastiveLoss(tau)(torch.from_numpy(first), torch.from_numpy(second))
    assert value.item() == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("M", [1, 2, 7])
def test_identical_orthonormal_views_give_the_closed_form(M):
    # each item's view is its own, the others orthogonal:
    # -1/tau + log(e^(1/tau) + (M - 1)) = log(1 + (M - 1) e^(-1/tau))
    tau = 0.1
    views = torch.eye(M, 8, dtype=torch.float64)
    value = ViewContrastiveLoss(tau)(views, views.clone())
    assert value.item() == pytest.approx(math.log1p((M - 1) * math.exp(-1 / tau)), rel=1e-12)


def test_a_gradient_step_brings_each_items_views_together():
    generator = torch.Generator().manual_seed(0)
    first = torch.randn(6, 4, generator=generator, dtype=torch.float64, requires_grad=True)
    second = torch.randn(6, 4, generator=generator, dtype=torch.float64)
    loss = ViewContrastiveLoss(0.5)
    value = loss(first, second)
    value.backward()
    stepped = (first - 0.05 * first.grad).detach()
    assert loss(stepped, second) < value

    def own(views: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.cosine_similarity(views, second, dim=1)

    assert own(stepped).mean() > own(first.detach()).mean()


def test_no_items_cost_nothing_and_stay_attached():
    first = torch.zeros(0, 4, requires_grad=True)
    value = ViewContrastiveLoss(0.1)(first, torch.zeros(0, 4))
    assert value.item() == 0.0
    value.backward()
    assert first.grad is not None


def test_bad_shapes_and_temperature_are_refused():
    loss = ViewContrastiveLoss(0.1)
    with pytest.raises(ValueError, match="two views of one shape"):
        loss(torch.zeros(3, 4), torch.zeros(2, 4))
    with pytest.raises(ValueError, match="two views of one shape"):
        loss(torch.zeros(3), torch.zeros(3))
    with pytest.raises(ValueError, match="temperature must be > 0"):
        ViewContrastiveLoss(0.0)
