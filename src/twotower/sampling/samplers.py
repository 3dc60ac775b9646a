"""Negative samplers over the item corpus: uniform and popularity**alpha.

Items are dense indices 0..N-1. Every draw is vectorized over the whole batch and
comes from the ``torch.Generator`` passed in (a CPU generator), so the same generator
state gives the same negatives. Draws are made on the CPU and moved to the device of
``positives``.

A per-example negative that equals its row's positive is redrawn: only the colliding
entries are drawn again, for at most ``MAX_REDRAW_ROUNDS`` rounds. Redrawing from the
same distribution is rejection sampling, so the negatives of a row with positive p
follow the target distribution renormalised without p. When p holds nearly all the
probability mass no number of rounds helps; whatever still collides after the last
round is returned as is, and the caller masks it with the loss's negative mask.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch

# Each round redraws only the entries that still collide; with a positive holding
# probability q of the mass, an entry survives all rounds with probability q**21.
MAX_REDRAW_ROUNDS = 20


class _ItemSampler:
    """Shared ``sample`` / ``sample_shared`` on top of a subclass's ``_draw``."""

    num_items: int

    def _draw(self, shape: tuple[int, ...], generator: torch.Generator | None) -> torch.Tensor:
        """Independent int64 draws of the target distribution, on the CPU."""
        raise NotImplementedError

    def sample(
        self, positives: torch.Tensor, n: int, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Draws n negatives per row, avoiding the row's positive where redraws allow.

        Args:
            positives: (B,) int64 the positive item of each row.
            n: negatives per row, >= 0.
            generator: CPU generator the draws come from; the global one if None.

        Returns:
            (B, n) int64 item indices on the device of ``positives``. An entry may still
            equal its row's positive after ``MAX_REDRAW_ROUNDS`` rounds (see module doc).
        """
        if positives.dim() != 1:
            raise ValueError(f"positives must be 1-D (B,), got shape {tuple(positives.shape)}")
        if n < 0:
            raise ValueError(f"n must be >= 0, got {n}")
        negatives = self._draw((len(positives), n), generator)  # (B, n)
        negatives = _redraw_collisions(negatives, positives.cpu(), self._draw, generator)
        return negatives.to(positives.device)

    def sample_shared(self, m: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """Draws m items shared by the whole batch; there is no positive to avoid.

        Args:
            m: number of items, >= 0.
            generator: CPU generator the draws come from; the global one if None.

        Returns:
            (m,) int64 item indices on the CPU.
        """
        if m < 0:
            raise ValueError(f"m must be >= 0, got {m}")
        return self._draw((m,), generator)


def _redraw_collisions(
    negatives: torch.Tensor,
    positives: torch.Tensor,
    draw: Callable[[tuple[int, ...], torch.Generator | None], torch.Tensor],
    generator: torch.Generator | None,
) -> torch.Tensor:
    """Redraws, in place and in bounded rounds, the negatives equal to their row's positive.

    Args:
        negatives: (B, n) int64 first draws, contiguous.
        positives: (B,) int64 on the same device as ``negatives``.
        draw: ``draw(shape, generator)`` giving fresh draws of the same distribution.
        generator: passed on to ``draw``.

    Returns:
        ``negatives``, with collisions redrawn for at most ``MAX_REDRAW_ROUNDS`` rounds.
    """
    flat = negatives.view(-1)  # (B * n,)
    row_positive = positives.repeat_interleave(negatives.shape[1])  # (B * n,)
    colliding = torch.nonzero(flat == row_positive).squeeze(1)
    targets = row_positive[colliding]
    # Only the entries just redrawn can still collide, so each round checks only those.
    for _ in range(MAX_REDRAW_ROUNDS):
        if len(colliding) == 0:
            break
        fresh = draw((len(colliding),), generator)
        flat[colliding] = fresh
        still = fresh == targets
        colliding, targets = colliding[still], targets[still]
    return negatives


class UniformSampler(_ItemSampler):
    """Draws items uniformly over the corpus: probability 1/N each.

    Args:
        num_items: N, the corpus size, >= 1.
    """

    def __init__(self, num_items: int) -> None:
        if num_items < 1:
            raise ValueError(f"num_items must be >= 1, got {num_items}")
        self.num_items = int(num_items)

    def _draw(self, shape: tuple[int, ...], generator: torch.Generator | None) -> torch.Tensor:
        return torch.randint(0, self.num_items, shape, generator=generator, dtype=torch.int64)

    def log_prob(self, items: torch.Tensor) -> torch.Tensor:
        """Log of each item's draw probability, log(1/N).

        Args:
            items: any shape, int64 item indices.

        Returns:
            float32, the shape and device of ``items``.
        """
        return torch.full(
            items.shape, -math.log(self.num_items), dtype=torch.float32, device=items.device
        )


class PopularitySampler(_ItemSampler):
    """Draws item i with probability proportional to count_i**alpha; unseen items never.

    The weight is count**alpha for count > 0 and 0 for count == 0, so alpha = 0 is
    uniform over the items seen in training and alpha = 1 follows the training
    distribution. Draws use the inverse CDF (``torch.searchsorted`` over a float64
    cumulative sum), which, unlike ``torch.multinomial``, has no limit of 2**24
    categories.

    Args:
        counts: (N,) non-negative training counts, at least one of them > 0.
        alpha: the exponent, >= 0.
    """

    def __init__(self, counts: np.ndarray | torch.Tensor, alpha: float = 0.75) -> None:
        counts = torch.as_tensor(np.asarray(counts, dtype=np.float64))
        _check_counts(counts, alpha)
        positive = counts > 0
        weights = torch.zeros_like(counts)  # (N,) float64; 0 for unseen items
        weights[positive] = counts[positive] ** alpha
        self.num_items = len(counts)
        self.alpha = float(alpha)
        self._cdf = torch.cumsum(weights, 0)  # (N,) float64, flat over zero-weight items
        # A uniform draw can round up to the total, past the last step of the CDF; it
        # then belongs to the last item with weight, not to a trailing zero-weight item.
        self._last = int(torch.nonzero(positive)[-1])
        self._weights = weights

    def _draw(self, shape: tuple[int, ...], generator: torch.Generator | None) -> torch.Tensor:
        u = torch.rand(shape, generator=generator, dtype=torch.float64) * self._cdf[-1]
        # right=True picks the first i with cdf[i] > u, so item i owns [cdf[i-1], cdf[i]):
        # an empty interval for a zero-weight item, which is therefore never returned.
        return torch.searchsorted(self._cdf, u, right=True).clamp_(max=self._last)

    def log_prob(self, items: torch.Tensor) -> torch.Tensor:
        """Log of each item's draw probability; -inf for items with count 0.

        Args:
            items: any shape, int64 item indices.

        Returns:
            float32, the shape and device of ``items``.
        """
        probs = self._weights[items.cpu()] / self._cdf[-1]
        return torch.log(probs).to(torch.float32).to(items.device)


def _check_counts(counts: torch.Tensor, alpha: float) -> None:
    if counts.dim() != 1:
        raise ValueError(f"counts must be 1-D (N,), got shape {tuple(counts.shape)}")
    if not bool(torch.isfinite(counts).all()) or bool((counts < 0).any()):
        raise ValueError("counts must be finite and non-negative")
    if not bool((counts > 0).any()):
        raise ValueError("counts must hold at least one positive count; no item could be drawn")
    if not alpha >= 0:
        raise ValueError(f"alpha must be >= 0, got {alpha}")


SAMPLERS: dict[str, type[UniformSampler | PopularitySampler]] = {
    "uniform": UniformSampler,
    "popularity": PopularitySampler,
}
