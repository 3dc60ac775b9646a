"""Candidate sets shared by a whole batch, with their log sampling probability (log Q).

A softmax objective scores every query of the batch against the same M candidates.
The candidates are not drawn uniformly, so the loss subtracts each candidate's log Q
from its score (the logQ correction); only differences of log Q between candidates
matter, so any constant shift of it is harmless.

The frequency estimate is not updated here: for a ``StreamingFrequency`` the training
loop calls ``frequency.update(positives, step)`` once per batch.
"""

from __future__ import annotations

import torch

from twotower.sampling.frequency import ItemFrequency
from twotower.sampling.samplers import UniformSampler


class InBatchSampler:
    """The batch's own positives as the candidates (M = B).

    In-batch negatives are drawn from the training distribution itself, so a popular
    item is over-sampled as a negative in proportion to its frequency; log Q = log p_j,
    the item's frequency, is what the logQ correction subtracts to undo that.

    Args:
        frequency: the estimate of each item's share of the training stream.
    """

    def __init__(self, frequency: ItemFrequency) -> None:
        self.frequency = frequency

    def candidates(
        self, positives: torch.Tensor, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The positives and their log frequency.

        Args:
            positives: (B,) int64 the positive item of each row.
            generator: unused; kept so that every candidate sampler is called alike.

        Returns:
            ``(ids, log_q)``: (B,) int64 the positives themselves (repeats included;
            the loss masks accidental hits) and (B,) float32 ``frequency.log_prob``.
        """
        return positives, self.frequency.log_prob(positives)


class MixedSampler:
    """The batch's positives plus m items drawn uniformly from the corpus (M = B + m).

    Mixed negative sampling (Yang et al. 2020, "Mixed negative sampling for learning
    two-tower neural networks in recommendations"): in-batch candidates alone never
    show the model the items that are rare in training; the uniform part does.

    An item j can enter the candidate set through either part, so its log Q is the
    log of its expected number of occurrences in the whole set, the same term whichever
    part it came from: B * p_j from the B positives, with p_j its per-example
    probability, plus m / N from the m uniform draws:

        log_q_j = log(B * p_j + m / N)

    For a ``CountFrequency`` p_j = count_j / total. A ``StreamingFrequency`` estimates
    the probability that a step holds j, which for an item rarer than once per batch
    is about B * p_j already, so its ``exp(log_prob)`` is used as B * p_j directly
    (it underestimates items seen several times in one batch). With m = 0 this is
    log p_j plus the constant log B, the in-batch correction.

    Args:
        frequency: the estimate of each item's share of the training stream.
        num_items: N, the corpus size.
        num_sampled: m, the uniform draws per batch, >= 0.
    """

    def __init__(self, frequency: ItemFrequency, num_items: int, num_sampled: int) -> None:
        if num_sampled < 0:
            raise ValueError(f"num_sampled must be >= 0, got {num_sampled}")
        self.frequency = frequency
        self.num_items = int(num_items)
        self.num_sampled = int(num_sampled)
        self._uniform = UniformSampler(num_items)

    def candidates(
        self, positives: torch.Tensor, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The positives, then m uniform corpus items, and the log Q of each.

        Args:
            positives: (B,) int64 the positive item of each row.
            generator: CPU generator the uniform draws come from; the global one if None.

        Returns:
            ``(ids, log_q)``: (B + m,) int64 and (B + m,) float32, on the device of
            ``positives``.
        """
        sampled = self._uniform.sample_shared(self.num_sampled, generator)  # (m,)
        ids = torch.cat([positives, sampled.to(positives.device)])  # (M,)
        log_q = torch.log(self.expected_counts(ids, len(positives)))
        return ids, log_q.to(torch.float32)

    def expected_counts(self, items: torch.Tensor, batch_size: int) -> torch.Tensor:
        """Float64 of the shape of ``items``: each item's expected number of occurrences
        in a candidate set of ``batch_size`` positives and the m uniform draws,
        ``B p_j + m / N`` (the exponent of its log Q)."""
        log_p = self.frequency.log_prob(items.reshape(-1)).view(items.shape)
        p = torch.exp(log_p.to(torch.float64))
        from_positives = p if self.frequency.per_step else batch_size * p
        return from_positives + self.num_sampled / self.num_items


CANDIDATE_SAMPLERS: dict[str, type[InBatchSampler | MixedSampler]] = {
    "in_batch": InBatchSampler,
    "mixed": MixedSampler,
}
