import math

import torch

from twotower.sampling import (
    CANDIDATE_SAMPLERS,
    CountFrequency,
    InBatchSampler,
    MixedSampler,
    StreamingFrequency,
)


def test_registry_names_the_candidate_samplers():
    expected = {"in_batch": InBatchSampler, "mixed": MixedSampler}
    assert expected == CANDIDATE_SAMPLERS


def test_in_batch_candidates_are_the_positives_with_their_log_frequency():
    frequency = CountFrequency(torch.tensor([1.0, 2.0, 3.0, 4.0]))
    positives = torch.tensor([3, 0, 3])
    ids, log_q = InBatchSampler(frequency).candidates(positives)
    assert ids is positives
    assert torch.equal(log_q, frequency.log_prob(positives))


def test_mixed_log_q_by_hand():
    # counts [1, 2, 3, 4] -> p = [0.1, 0.2, 0.3, 0.4]; B = 3, m = 2, N = 4:
    # log_q_j = log(3 * p_j + 2 / 4), the same for a positive and a sampled item.
    frequency = CountFrequency(torch.tensor([1.0, 2.0, 3.0, 4.0]))
    ids, log_q = MixedSampler(frequency, num_items=4, num_sampled=2).candidates(
        torch.tensor([0, 3, 3]), torch.Generator().manual_seed(0)
    )
    p = torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=torch.float64)
    expected = torch.log(3 * p[ids] + 0.5).to(torch.float32)
    assert ids.shape == (5,) and torch.equal(ids[:3], torch.tensor([0, 3, 3]))
    assert torch.allclose(log_q, expected, rtol=1e-6)


def test_mixed_with_streaming_uses_the_per_step_probability_directly():
    frequency = StreamingFrequency(num_buckets=64)
    frequency.update(torch.tensor([2]), step=4)  # item 2: once in 4 steps -> 1/4 per step
    ids, log_q = MixedSampler(frequency, num_items=10, num_sampled=5).candidates(
        torch.tensor([2, 2]), torch.Generator().manual_seed(0)
    )
    assert math.isclose(float(log_q[0]), math.log(0.25 + 5 / 10), rel_tol=1e-6)


def test_mixed_without_samples_is_in_batch_shifted_by_log_b():
    frequency = CountFrequency(torch.tensor([5.0, 1.0, 2.0]))
    positives = torch.tensor([0, 2, 1, 0])
    _, mixed = MixedSampler(frequency, num_items=3, num_sampled=0).candidates(positives)
    _, in_batch = InBatchSampler(frequency).candidates(positives)
    assert torch.allclose(mixed - in_batch, torch.full((4,), math.log(4)))
