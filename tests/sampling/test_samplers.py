import math

import numpy as np
import pytest
import torch

from twotower.sampling import SAMPLERS, PopularitySampler, UniformSampler


def test_registry_names_the_samplers():
    expected = {"uniform": UniformSampler, "popularity": PopularitySampler}
    assert expected == SAMPLERS


def test_uniform_log_prob_is_minus_log_n():
    log_q = UniformSampler(8).log_prob(torch.tensor([[0, 7], [3, 3]]))
    assert log_q.shape == (2, 2) and log_q.dtype == torch.float32
    assert torch.allclose(log_q, torch.full((2, 2), -math.log(8)))


def test_popularity_log_prob_by_hand_with_minus_inf_for_unseen():
    # weights count**1: [0, 1, 3, 0] -> probabilities [0, 1/4, 3/4, 0]
    sampler = PopularitySampler(torch.tensor([0.0, 1.0, 3.0, 0.0]), alpha=1.0)
    log_q = sampler.log_prob(torch.arange(4))
    assert torch.allclose(log_q[1:3], torch.log(torch.tensor([0.25, 0.75])))
    assert log_q[0] == -math.inf and log_q[3] == -math.inf


def test_popularity_alpha_zero_is_uniform_over_seen_items():
    sampler = PopularitySampler(np.array([0, 1, 100, 0, 5]), alpha=0.0)
    expected = torch.tensor([-math.inf, -math.log(3), -math.log(3), -math.inf, -math.log(3)])
    assert torch.allclose(sampler.log_prob(torch.arange(5)), expected)


def test_popularity_beyond_the_multinomial_category_limit():
    counts = np.zeros(2**24 + 3)
    counts[[5, 2**24 + 1]] = [1.0, 3.0]
    ids = PopularitySampler(counts, alpha=1.0).sample_shared(4000, torch.Generator().manual_seed(0))
    assert set(ids.tolist()) == {5, 2**24 + 1}
    assert 0.70 < float((ids == 2**24 + 1).float().mean()) < 0.80


def test_unmovable_collisions_are_left_after_the_last_round():
    # Item 0 holds all but ~2e-12 of the mass: no redraw can move a negative off it, so
    # the collisions are returned after the last round for the loss to mask.
    sampler = PopularitySampler(np.array([1e12, 1.0, 1.0]), alpha=1.0)
    positives = torch.zeros(50, dtype=torch.int64)
    negatives = sampler.sample(positives, 4, torch.Generator().manual_seed(0))
    assert negatives.shape == (50, 4)
    assert bool((negatives == 0).all())


def test_zero_negatives_and_zero_shared():
    sampler = UniformSampler(5)
    assert sampler.sample(torch.tensor([1, 2]), 0).shape == (2, 0)
    assert sampler.sample_shared(0).shape == (0,)


@pytest.mark.parametrize(
    "counts, alpha, message",
    [
        (np.array([1.0, 2.0]), -0.5, "alpha"),
        (np.zeros(4), 0.75, "at least one positive"),
        (np.array([1.0, -1.0]), 0.75, "non-negative"),
        (np.array([1.0, np.nan]), 0.75, "finite"),
        (np.ones((2, 2)), 0.75, "1-D"),
    ],
)
def test_popularity_rejects_bad_input(counts, alpha, message):
    with pytest.raises(ValueError, match=message):
        PopularitySampler(counts, alpha=alpha)


def test_bad_arguments_are_rejected():
    with pytest.raises(ValueError, match="num_items"):
        UniformSampler(0)
    with pytest.raises(ValueError, match="n must be"):
        UniformSampler(3).sample(torch.tensor([0]), -1)
    with pytest.raises(ValueError, match="1-D"):
        UniformSampler(3).sample(torch.zeros(2, 2, dtype=torch.int64), 1)
