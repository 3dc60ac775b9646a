"""Estimates of how often each item is sampled as a candidate, for the logQ correction.

In-batch candidates are the batch's positives, so an item's sampling probability is
its share of the training stream. A softmax only sees differences of scores, so only
differences of ``log_prob`` between items matter: an estimate that is off by the same
factor for every item gives the same correction.

- ``CountFrequency``: exact, from training counts known in advance.
- ``StreamingFrequency``: learned from the stream of batches, with hashed arrays and
  no vocabulary (Yi et al. 2019, "Sampling-bias-corrected neural modeling for large
  corpus item recommendations").
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol

import numpy as np
import torch

_MASK32 = 0xFFFFFFFF
# Odd multipliers below 2**31, so that a 32-bit value times one fits in an int64 with no
# overflow. The first is 2**32 / phi**2 (Fibonacci hashing); the others are the
# fractional parts of the square roots of the primes 3..13 scaled to 2**31, made odd.
_MULTIPLIERS = (0x61C88647, 0x5DB3D743, 0x1E3779B9, 0x52A7FA9D, 0x2887293F, 0x4D82B447)


class ItemFrequency(Protocol):
    """What a candidate sampler needs from a frequency estimate.

    ``per_step`` says what ``exp(log_prob)`` estimates: False, the probability that one
    training example has the item (its share of the stream); True, the probability that
    a training step (a batch) contains it.
    """

    per_step: bool

    def log_prob(self, items: torch.Tensor) -> torch.Tensor: ...

    def update(self, items: torch.Tensor, step: int) -> None: ...

    def state_dict(self) -> dict[str, torch.Tensor]: ...

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None: ...


class CountFrequency:
    """Item probabilities from known training counts: count / total.

    Args:
        counts: (N,) non-negative training counts, summing to more than 0.
    """

    per_step = False

    def __init__(self, counts: np.ndarray | torch.Tensor) -> None:
        counts = torch.as_tensor(np.asarray(counts, dtype=np.float64))
        if counts.dim() != 1 or bool((counts < 0).any()) or not float(counts.sum()) > 0:
            raise ValueError("counts must be a 1-D array of non-negative counts with sum > 0")
        # An in-batch candidate is a training positive, so its count is >= 1 anyway; the
        # floor only keeps -inf out for items that are scored but were never seen.
        floored = counts.clamp(min=1.0)
        self._log_probs = torch.log(floored / counts.sum()).to(torch.float32)  # (N,)

    def log_prob(self, items: torch.Tensor) -> torch.Tensor:
        """log(count / total) of each item, the count floored at 1.

        Args:
            items: any shape, int64 item indices.

        Returns:
            float32, the shape and device of ``items``.
        """
        return self._log_probs[items.cpu()].to(items.device)

    def update(self, items: torch.Tensor, step: int) -> None:
        """Does nothing: the counts are fixed. Kept so both estimators are used alike."""

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Nothing to save: the counts come from the training data."""
        return {}

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        """Accepts the empty state of ``state_dict``."""
        if state:
            raise ValueError(f"CountFrequency has no state, got keys {sorted(state)}")


def hash_items(items: torch.Tensor, num_buckets: int, num_hashes: int = 1) -> torch.Tensor:
    """Buckets of item indices under fixed multiplicative hashes, the same in every process.

    Hash k folds the index to 32 bits (x ^ (x >> 32)), multiplies it by the odd constant
    ``_MULTIPLIERS[k]`` modulo 2**32 and maps the product to [0, num_buckets) by its
    high bits (``product * num_buckets >> 32``). Every step fits in an int64.

    Args:
        items: (n,) non-negative int64 item indices.
        num_buckets: the bucket count, in [1, 2**31].
        num_hashes: how many hash functions, in [1, len(_MULTIPLIERS)].

    Returns:
        (num_hashes, n) int64 buckets, on the device of ``items``.
    """
    folded = (items ^ (items >> 32)) & _MASK32  # (n,)
    multipliers = torch.tensor(_MULTIPLIERS[:num_hashes], device=items.device)[:, None]
    products = (folded[None, :] * multipliers) & _MASK32  # (H, n)
    return (products * num_buckets) >> 32


class StreamingFrequency:
    """Streaming item-frequency estimate from hashed arrays (Yi et al. 2019).

    Per bucket h, A[h] is the last step its item was seen and B[h] an exponential
    moving average of the steps between two sightings. When a batch at step t holds
    an item: ``B[h] = (1 - lr) * B[h] + lr * (t - A[h])``, then ``A[h] = t``; the item's
    probability of appearing in a step is 1 / B[h].

    The paper starts from A = B = 0, which gives a new item a tiny B (lr * t) and so a
    huge probability. Here B = 0 only marks a bucket never seen: a bucket's first
    sighting sets B to the whole gap t - A (one sighting in t steps), not a blend with
    0. An item not yet seen by step t gets 1 / t: absent for t steps, its rate is likely
    lower still, and 1 / t is what a sighting at step t would give it. B is kept >= 1,
    as a step counts an item at most once (a step repeated in ``update`` would
    otherwise push B below 1).

    With ``num_hashes`` > 1 the item keeps one pair of arrays per hash and its B is the
    largest of them: a collision only ever adds sightings, so the largest gap is the
    least polluted (the paper's multiple-hash variant).

    Args:
        num_buckets: buckets per hash array, in [1, 2**31]; memory is 16 bytes each.
        learning_rate: lr in (0, 1], the weight of the newest gap.
        num_hashes: hash arrays, in [1, 6].
    """

    per_step = True

    def __init__(
        self, num_buckets: int = 2**20, learning_rate: float = 0.01, num_hashes: int = 1
    ) -> None:
        if not 1 <= num_buckets <= 2**31:
            raise ValueError(f"num_buckets must be in [1, 2**31], got {num_buckets}")
        if not 0 < learning_rate <= 1:
            raise ValueError(f"learning_rate must be in (0, 1], got {learning_rate}")
        if not 1 <= num_hashes <= len(_MULTIPLIERS):
            raise ValueError(f"num_hashes must be in [1, {len(_MULTIPLIERS)}], got {num_hashes}")
        self.num_buckets = int(num_buckets)
        self.learning_rate = float(learning_rate)
        self.num_hashes = int(num_hashes)
        self.last_seen = torch.zeros(num_hashes, num_buckets, dtype=torch.int64)  # A
        self.gap = torch.zeros(num_hashes, num_buckets, dtype=torch.float64)  # B; 0: unseen
        self.step = 0  # the latest step passed to ``update``

    def _flat_buckets(self, items: torch.Tensor) -> torch.Tensor:
        """(H, n) positions of the items' buckets in the flattened (H * num_buckets) arrays."""
        buckets = hash_items(items.reshape(-1).cpu(), self.num_buckets, self.num_hashes)
        return buckets + torch.arange(self.num_hashes)[:, None] * self.num_buckets

    def update(self, items: torch.Tensor, step: int) -> None:
        """Records that the items were seen at ``step``; repeats within a batch count once.

        Args:
            items: (B,) int64 the batch's positive items.
            step: the training step, non-decreasing from call to call.
        """
        # Items that share a bucket make one sighting of it, as in the paper.
        flat = torch.unique(self._flat_buckets(items))
        last_seen, gap = self.last_seen.view(-1), self.gap.view(-1)
        elapsed = (step - last_seen[flat]).to(torch.float64)
        old = gap[flat]
        new = torch.where(
            old > 0, (1 - self.learning_rate) * old + self.learning_rate * elapsed, elapsed
        )
        gap[flat] = new.clamp(min=1.0)
        last_seen[flat] = step
        self.step = max(self.step, int(step))

    def log_prob(self, items: torch.Tensor) -> torch.Tensor:
        """-log B of each item: the log probability that a step contains it.

        Args:
            items: any shape, int64 item indices.

        Returns:
            float32, the shape and device of ``items``; -log(max(step, 1)) for items not
            seen yet.
        """
        gaps = self.gap.view(-1)[self._flat_buckets(items)]  # (H, n)
        unseen = (gaps == 0).any(0)
        estimate = torch.where(unseen, float(max(self.step, 1)), gaps.max(0).values)
        return (-torch.log(estimate)).to(torch.float32).reshape(items.shape).to(items.device)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The arrays and the latest step, for a checkpoint (copies)."""
        return {
            "last_seen": self.last_seen.clone(),
            "gap": self.gap.clone(),
            "step": torch.tensor(self.step, dtype=torch.int64),
        }

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        """Restores ``state_dict`` exactly, so a resumed run continues identically."""
        for name in ("last_seen", "gap"):
            if tuple(state[name].shape) != tuple(getattr(self, name).shape):
                raise ValueError(
                    f"{name} has shape {tuple(state[name].shape)}, expected "
                    f"{tuple(getattr(self, name).shape)} (num_hashes, num_buckets)"
                )
        self.last_seen = state["last_seen"].to(torch.int64).clone()
        self.gap = state["gap"].to(torch.float64).clone()
        self.step = int(state["step"])


FREQUENCIES: dict[str, type[CountFrequency | StreamingFrequency]] = {
    "counts": CountFrequency,
    "streaming": StreamingFrequency,
}
