import math

import pytest
import torch

from twotower.sampling import FREQUENCIES, CountFrequency, StreamingFrequency, hash_items


def test_registry_names_the_estimators():
    expected = {"counts": CountFrequency, "streaming": StreamingFrequency}
    assert expected == FREQUENCIES


def test_count_log_prob_by_hand():
    # total 10; item 0 has no count and is floored at 1
    frequency = CountFrequency(torch.tensor([0.0, 1.0, 3.0, 6.0]))
    expected = torch.log(torch.tensor([0.1, 0.1, 0.3, 0.6]))
    assert torch.allclose(frequency.log_prob(torch.arange(4)), expected)
    assert frequency.log_prob(torch.tensor([[3]])).shape == (1, 1)


def test_count_frequency_has_no_state():
    frequency = CountFrequency([1, 2])
    before = frequency.log_prob(torch.arange(2))
    frequency.update(torch.tensor([0, 0, 0]), step=5)
    frequency.load_state_dict(frequency.state_dict())
    assert frequency.state_dict() == {}
    assert torch.equal(frequency.log_prob(torch.arange(2)), before)
    with pytest.raises(ValueError, match="no state"):
        frequency.load_state_dict({"gap": torch.zeros(1)})


def _stream(frequency: StreamingFrequency, steps: range) -> None:
    """Item 1 in every step; item 2 in every 4th step (starting at the first)."""
    for step in steps:
        batch = [1, 1, 2] if step % 4 == 1 else [1, 1]
        frequency.update(torch.tensor(batch), step)


@pytest.mark.parametrize("num_hashes", [1, 3])
def test_streaming_estimates_per_step_probability(num_hashes):
    frequency = StreamingFrequency(num_buckets=4096, learning_rate=0.01, num_hashes=num_hashes)
    _stream(frequency, range(1, 2001))
    probability = frequency.log_prob(torch.tensor([1, 2])).exp()
    assert probability.dtype == torch.float32
    assert abs(float(probability[0]) - 1.0) < 0.05
    assert abs(float(probability[1]) - 0.25) < 0.05 * 0.25


def test_streaming_unseen_item_gets_one_over_the_step():
    frequency = StreamingFrequency(num_buckets=4096)
    assert float(frequency.log_prob(torch.tensor([9]))) == 0.0
    _stream(frequency, range(1, 41))
    assert math.isclose(float(frequency.log_prob(torch.tensor([9]))), -math.log(40), rel_tol=1e-6)


def test_streaming_first_sighting_takes_the_whole_gap():
    frequency = StreamingFrequency(num_buckets=4096, learning_rate=0.01)
    frequency.update(torch.tensor([3]), step=8)
    assert math.isclose(float(frequency.log_prob(torch.tensor([3]))), -math.log(8), rel_tol=1e-6)
    frequency.update(torch.tensor([3]), step=10)  # B = 0.99 * 8 + 0.01 * 2
    expected = -math.log(0.99 * 8 + 0.01 * 2)
    assert math.isclose(float(frequency.log_prob(torch.tensor([3]))), expected, rel_tol=1e-6)


def test_streaming_state_round_trip_continues_identically():
    original = StreamingFrequency(num_buckets=512, learning_rate=0.05, num_hashes=2)
    _stream(original, range(1, 101))
    resumed = StreamingFrequency(num_buckets=512, learning_rate=0.05, num_hashes=2)
    resumed.load_state_dict(original.state_dict())
    for frequency in (original, resumed):
        _stream(frequency, range(101, 151))
    items = torch.arange(10)
    assert torch.equal(original.log_prob(items), resumed.log_prob(items))
    assert all(torch.equal(v, resumed.state_dict()[k]) for k, v in original.state_dict().items())


def test_streaming_rejects_a_state_of_another_shape():
    with pytest.raises(ValueError, match="num_buckets"):
        StreamingFrequency(num_buckets=8).load_state_dict(StreamingFrequency(16).state_dict())


def _oracle_bucket(item: int, num_buckets: int, multiplier: int) -> int:
    """The documented hash in plain Python integers."""
    folded = (item ^ (item >> 32)) & 0xFFFFFFFF
    return ((folded * multiplier) & 0xFFFFFFFF) * num_buckets >> 32


def test_hash_is_the_documented_multiplicative_hash():
    items = [0, 1, 2, 12345, 2**31 - 1, 2**40 + 5]
    buckets = hash_items(torch.tensor(items), num_buckets=1000, num_hashes=2)
    assert buckets.tolist() == [
        [_oracle_bucket(i, 1000, 0x61C88647) for i in items],
        [_oracle_bucket(i, 1000, 0x5DB3D743) for i in items],
    ]


def test_hash_is_the_same_across_instances():
    items = torch.arange(0, 10_000, 7)
    first, second = StreamingFrequency(), StreamingFrequency()
    first.update(items, step=3)
    second.update(items, step=3)
    assert torch.equal(first.state_dict()["last_seen"], second.state_dict()["last_seen"])
    assert int((first.state_dict()["last_seen"] == 3).sum()) == len(items)  # no collisions


@pytest.mark.parametrize(
    "kwargs",
    [{"num_buckets": 0}, {"learning_rate": 0.0}, {"learning_rate": 1.5}, {"num_hashes": 7}],
)
def test_streaming_rejects_bad_arguments(kwargs):
    with pytest.raises(ValueError):
        StreamingFrequency(**kwargs)
