"""Every sampler's empirical distribution over many draws matches its target.

Each check is a chi-square goodness-of-fit test (p-value > 1e-3, fixed seeds) and a
total-variation distance below 0.02; items the target never draws must never appear.
"""

import numpy as np
import pytest
import torch
from scipy.stats import chisquare

from twotower.sampling import CountFrequency, MixedSampler, PopularitySampler, UniformSampler

DRAWS = 200_000
N = 50
# Zipf-like counts with unseen items first, inside and last (the CDF's flat segments).
SKEWED = np.floor(1000 / np.arange(1, N + 1))
SKEWED[[0, 17, 18, N - 1]] = 0


def _assert_follows(ids: torch.Tensor, target: np.ndarray) -> None:
    target = target / target.sum()
    observed = np.bincount(ids.numpy().ravel(), minlength=len(target))
    support = target > 0
    assert observed[~support].sum() == 0
    expected = target[support] * observed.sum()
    assert chisquare(observed[support], expected).pvalue > 1e-3
    total_variation = 0.5 * np.abs(observed / observed.sum() - target).sum()
    assert total_variation < 0.02


def _popularity_target(counts: np.ndarray, alpha: float) -> np.ndarray:
    return np.where(counts > 0, counts**alpha, 0.0)


def test_uniform_shared_draws_are_uniform():
    ids = UniformSampler(N).sample_shared(DRAWS, torch.Generator().manual_seed(0))
    _assert_follows(ids, np.ones(N))


@pytest.mark.parametrize("alpha", [0.0, 0.75, 1.0])
def test_popularity_shared_draws_follow_count_to_the_alpha(alpha):
    sampler = PopularitySampler(SKEWED, alpha=alpha)
    ids = sampler.sample_shared(DRAWS, torch.Generator().manual_seed(1))
    _assert_follows(ids, _popularity_target(SKEWED, alpha))


@pytest.mark.parametrize("alpha", [0.0, 0.75, 1.0])
def test_popularity_log_prob_is_the_target(alpha):
    sampler = PopularitySampler(SKEWED, alpha=alpha)
    target = _popularity_target(SKEWED, alpha)
    with np.errstate(divide="ignore"):
        expected = np.log(target / target.sum())
    np.testing.assert_allclose(sampler.log_prob(torch.arange(N)).numpy(), expected, rtol=1e-6)


def test_per_example_negatives_away_from_the_positive_follow_the_target():
    # Positives far in the tail: redraws are rare, so the rows follow the target.
    sampler = PopularitySampler(SKEWED, alpha=0.75)
    positives = torch.full((DRAWS // 10,), N - 2)
    ids = sampler.sample(positives, 10, torch.Generator().manual_seed(2))
    target = _popularity_target(SKEWED, 0.75)
    target[N - 2] = 0
    _assert_follows(ids, target)


@pytest.mark.parametrize(
    "sampler, target",
    [
        (UniformSampler(3), np.ones(3)),
        (PopularitySampler(np.array([2.0, 3.0, 4.0]), alpha=1.0), np.array([2.0, 3.0, 4.0])),
    ],
    ids=["uniform", "popularity"],
)
def test_redraws_never_return_the_positive_and_keep_the_conditional(sampler, target):
    positives = torch.arange(30_000) % 3
    negatives = sampler.sample(positives, 4, torch.Generator().manual_seed(3))
    assert not bool((negatives == positives[:, None]).any())
    for p in range(3):
        conditional = target.copy()
        conditional[p] = 0  # the target renormalised without the positive
        _assert_follows(negatives[positives == p], conditional)


def test_mixed_sampled_part_is_uniform():
    sampler = MixedSampler(CountFrequency(SKEWED), N, num_sampled=DRAWS)
    positives = torch.tensor([1, 2, 2, 5])
    ids, _ = sampler.candidates(positives, torch.Generator().manual_seed(4))
    assert torch.equal(ids[:4], positives)
    _assert_follows(ids[4:], np.ones(N))
