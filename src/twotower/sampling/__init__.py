"""Which negatives reach the loss. Items are dense indices 0..N-1; draws are vectorized
and reproducible through an explicit CPU ``torch.Generator``.

Per-example negatives (``sample``) and shared ones (``sample_shared``):

- ``UniformSampler``: every corpus item with probability 1/N.
- ``PopularitySampler``: item i with probability proportional to count_i**alpha.

Shared candidates for softmax objectives, with their log sampling probability:

- ``InBatchSampler``: the batch's own positives.
- ``MixedSampler``: the batch's positives plus m uniform corpus items.

Hard negatives mined from a model's ranking (``MinedNegatives``): each query's items
in a window of ranks, its training positives excluded, drawn uniformly per row.

Item-frequency estimates for the logQ correction:

- ``CountFrequency``: count / total from known training counts.
- ``StreamingFrequency``: learned from the batches with hashed arrays (Yi et al. 2019).
"""

from __future__ import annotations

from twotower.sampling.candidates import CANDIDATE_SAMPLERS, InBatchSampler, MixedSampler
from twotower.sampling.frequency import (
    FREQUENCIES,
    CountFrequency,
    ItemFrequency,
    StreamingFrequency,
    hash_items,
)
from twotower.sampling.mined import MinedNegatives
from twotower.sampling.samplers import (
    MAX_REDRAW_ROUNDS,
    SAMPLERS,
    PopularitySampler,
    UniformSampler,
)

__all__ = [
    "CANDIDATE_SAMPLERS",
    "FREQUENCIES",
    "MAX_REDRAW_ROUNDS",
    "SAMPLERS",
    "CountFrequency",
    "InBatchSampler",
    "ItemFrequency",
    "MinedNegatives",
    "MixedSampler",
    "PopularitySampler",
    "StreamingFrequency",
    "UniformSampler",
    "hash_items",
]
