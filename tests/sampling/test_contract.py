"""One contract for every sampler: shapes, dtypes, range and reproducible draws."""

import numpy as np
import pytest
import torch

from twotower.sampling import (
    CountFrequency,
    InBatchSampler,
    MixedSampler,
    PopularitySampler,
    UniformSampler,
)

N, B, NEG, M_SAMPLED = 40, 64, 5, 16
COUNTS = np.array([0, 0, 50, 3, 0, 7, 1] + [2] * (N - 8) + [0], dtype=np.float64)


def _positives(seed: int = 0) -> torch.Tensor:
    # Positives are training items, so they have a count > 0.
    seen = np.flatnonzero(COUNTS > 0)
    rng = np.random.default_rng(seed)
    return torch.from_numpy(rng.choice(seen, size=B))


def _negatives(sampler):
    def draw(generator):
        ids = sampler.sample(_positives(), NEG, generator)
        return ids, sampler.log_prob(ids)

    return draw, (B, NEG)


def _candidates(sampler, num_extra: int):
    def draw(generator):
        return sampler.candidates(_positives(), generator)

    return draw, (B + num_extra,)


CASES = {
    "uniform": lambda: _negatives(UniformSampler(N)),
    "popularity": lambda: _negatives(PopularitySampler(COUNTS, alpha=0.75)),
    "in_batch": lambda: _candidates(InBatchSampler(CountFrequency(COUNTS)), 0),
    "mixed": lambda: _candidates(MixedSampler(CountFrequency(COUNTS), N, M_SAMPLED), M_SAMPLED),
}


@pytest.fixture(params=sorted(CASES))
def case(request):
    return CASES[request.param]()


def test_shapes_and_dtypes(case):
    draw, shape = case
    ids, log_q = draw(torch.Generator().manual_seed(0))
    assert ids.shape == shape and ids.dtype == torch.int64
    assert log_q.shape == shape and log_q.dtype == torch.float32


def test_ids_in_range_with_finite_log_prob(case):
    draw, _ = case
    ids, log_q = draw(torch.Generator().manual_seed(1))
    assert int(ids.min()) >= 0 and int(ids.max()) < N
    assert bool(torch.isfinite(log_q).all())


def test_same_generator_state_gives_same_draws(case):
    draw, _ = case
    first, first_log_q = draw(torch.Generator().manual_seed(7))
    second, second_log_q = draw(torch.Generator().manual_seed(7))
    assert torch.equal(first, second) and torch.equal(first_log_q, second_log_q)


def test_global_generator_untouched_when_one_is_given(case):
    draw, _ = case
    before = torch.get_rng_state()
    draw(torch.Generator().manual_seed(3))
    assert torch.equal(torch.get_rng_state(), before)
