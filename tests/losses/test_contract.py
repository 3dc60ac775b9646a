"""One contract for every loss in LOSSES; SampledSoftmax is fed the same scores as
``[positive, negatives]`` columns with masked negatives set to -inf."""

import ast
import pathlib

import pytest
import torch

import twotower.losses
from twotower.losses import LOSSES, SampledSoftmax

NAMES = sorted(LOSSES)


def _loss(loss, pos, neg, mask=None):
    if isinstance(loss, SampledSoftmax):
        if mask is not None:
            neg = neg.masked_fill(~mask, float("-inf"))
        logits = torch.cat([pos[:, None], neg], dim=1)
        return loss(logits, torch.zeros(pos.shape[0], dtype=torch.int64))
    return loss(pos, neg, mask)


def _batch(B=6, n=5, spread=1.0):
    """Scores uniform in [-spread / 2, spread / 2) and a mask keeping about 70%."""
    generator = torch.Generator().manual_seed(0)
    pos = (torch.rand(B, generator=generator, dtype=torch.float64) - 0.5) * spread
    neg = (torch.rand(B, n, generator=generator, dtype=torch.float64) - 0.5) * spread
    mask = torch.rand(B, n, generator=generator) < 0.7
    return pos.requires_grad_(), neg.requires_grad_(), mask


def test_registry_names():
    assert set(LOSSES) == {"pointwise", "hinge", "logistic", "listwise", "in_batch", "mixed"}
    assert LOSSES["in_batch"] is LOSSES["mixed"] is SampledSoftmax


@pytest.mark.parametrize("name", NAMES)
def test_scalar_finite_and_differentiable(name):
    loss = LOSSES[name]()
    pos, neg, mask = _batch()
    value = _loss(loss, pos, neg, mask)
    assert value.shape == () and value.dtype == torch.float64
    assert torch.isfinite(value)
    value.backward()
    assert torch.isfinite(pos.grad).all() and torch.isfinite(neg.grad).all()
    assert list(loss.parameters()) == []


@pytest.mark.parametrize("name", NAMES)
def test_masking_a_negative_equals_removing_it(name):
    loss = LOSSES[name]()
    pos, neg, _ = _batch()
    mask = torch.ones(neg.shape, dtype=torch.bool)
    mask[:, 2] = False
    removed = torch.cat([neg[:, :2], neg[:, 3:]], dim=1)
    assert _loss(loss, pos, neg, mask).item() == pytest.approx(_loss(loss, pos, removed).item())


@pytest.mark.parametrize("name", NAMES)
def test_masked_slots_may_hold_anything(name):
    loss = LOSSES[name]()
    pos, neg, mask = _batch()
    junk = torch.tensor([float("nan"), float("inf"), float("-inf"), 1e30], dtype=torch.float64)
    junk = junk[torch.arange(neg.numel()) % 4].reshape(neg.shape)
    garbage = torch.where(mask, neg.detach(), junk).requires_grad_()
    clean = _loss(loss, pos, neg, mask)
    dirty = _loss(loss, pos, garbage, mask)
    assert dirty.item() == pytest.approx(clean.item())
    dirty.backward()
    assert (garbage.grad[~mask] == 0).all()
    assert torch.isfinite(garbage.grad).all()


@pytest.mark.parametrize("name", NAMES)
def test_gradient_raises_positives_and_lowers_negatives(name):
    loss = LOSSES[name]()
    # Scores within 0.4 of each other keep every triplet inside the default hinge margin.
    pos, neg, mask = _batch(spread=0.4)
    _loss(loss, pos, neg, mask).backward()
    assert (pos.grad <= 0).all() and (pos.grad < 0).any()
    assert (neg.grad[mask] > 0).all()


@pytest.mark.parametrize("name", NAMES)
def test_independent_of_row_order_column_order_and_repetition(name):
    loss = LOSSES[name]()
    pos, neg, mask = _batch()
    value = _loss(loss, pos, neg, mask).item()
    rows, cols = torch.randperm(6), torch.randperm(5)
    shuffled = _loss(loss, pos[rows], neg[rows][:, cols], mask[rows][:, cols])
    assert shuffled.item() == pytest.approx(value)
    twice = _loss(loss, pos.repeat(2), neg.repeat(2, 1), mask.repeat(2, 1))
    assert twice.item() == pytest.approx(value)


@pytest.mark.parametrize("name", NAMES)
def test_every_negative_masked_stays_finite_and_differentiable(name):
    loss = LOSSES[name]()
    pos, neg, _ = _batch()
    value = _loss(loss, pos, neg, torch.zeros(neg.shape, dtype=torch.bool))
    assert torch.isfinite(value)
    value.backward()
    assert (neg.grad == 0).all()


@pytest.mark.parametrize("name", NAMES)
def test_separated_scores_cost_less_than_swapped_ones(name):
    loss = LOSSES[name]()
    pos, neg = torch.full((4,), 10.0), torch.full((4, 3), -10.0)
    assert _loss(loss, pos, neg).item() < 1e-3
    assert _loss(loss, -pos, -neg).item() > 1.0


def test_losses_never_import_the_model_or_the_training_loop():
    for path in pathlib.Path(twotower.losses.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            elif isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            else:
                continue
            for name in names:
                assert not name.startswith(("twotower.towers", "twotower.training")), path.name
