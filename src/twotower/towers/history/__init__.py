"""History encoders beyond pooling: a query's (B, L) recent item codes -> one (B, D) vector
(or K interest vectors (B, K, D)).

Each reads the history through the item-id embedding table it shares with the item
tower, and outputs that table's width D:

    attention.py    attention pooling with learned recency embeddings
    transformer.py  causal self-attention blocks (SASRec); the most recent position
    gru.py          a GRU from the oldest item (GRU4Rec); its last state
    interests.py    K interest vectors (B, K, D) for multi-interest query towers
    order.py        the orderings they share (padding moved to the end)

``mean`` and ``sum`` pooling are ``twotower.towers.encoders.PooledEncoder``. What a
tower asks of an encoder is declared here (``HistoryEncoder``, ``SequenceEncoder``;
the extractors share ``InterestExtractor``); the registries map config names to the
classes.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch
from torch import nn

from twotower.towers.history.attention import AttentionPooling
from twotower.towers.history.gru import GRUEncoder
from twotower.towers.history.interests import (
    InterestExtractor,
    RoutingInterests,
    SelfAttentiveInterests,
)
from twotower.towers.history.transformer import CausalTransformer


@runtime_checkable
class HistoryEncoder(Protocol):
    """(B, L) item codes, most recent first, 0-padded -> (B, D), or (B, K, D) interests.

    Every feature encoder of a tower declares these attributes (an id's lookup is the
    plain case: one vector, no timestamps), and ``FeatureEncoders`` asks nothing else:

    Attributes:
        width: D, the last axis of the output.
        interests: K, the vectors per query: 1, or K > 1 for a multi-interest
            extractor, whose output is (B, K, D).
        times_input: the model input holding the items' timestamps, which the
            encoder is called with after the codes; None when it reads none.
    """

    width: int
    interests: int
    times_input: str | None

    def __call__(self, codes: torch.Tensor, *times: torch.Tensor) -> torch.Tensor:
        """(B, D) or (B, K, D) of (B, L) codes (and their (B, L) timestamps, when
        ``times_input`` names them)."""
        ...


@runtime_checkable
class SequenceEncoder(HistoryEncoder, Protocol):
    """A history encoder with an output at every position, so that one pass trains
    every prefix of a history (``FeatureEncoders.at_positions``).

    Attributes:
        table: the shared item-id embedding table the codes are looked up in.
    """

    table: nn.Embedding

    def sequence(self, items: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """(B, L, D) every position's output, of (B, L, D) oldest-first item embeddings
        of which each row's first ``lengths`` are real; position t encodes the
        history up to its t-th oldest item."""
        ...


HISTORY_ENCODERS: dict[str, type[HistoryEncoder]] = {
    "attention": AttentionPooling,
    "transformer": CausalTransformer,
    "gru": GRUEncoder,
}
# multi-interest extractors (``features.query.<history>.extractor``): interests K > 1
INTEREST_EXTRACTORS: dict[str, type[InterestExtractor]] = {
    "self_attention": SelfAttentiveInterests,
    "routing": RoutingInterests,
}

__all__ = [
    "HISTORY_ENCODERS",
    "INTEREST_EXTRACTORS",
    "AttentionPooling",
    "CausalTransformer",
    "GRUEncoder",
    "HistoryEncoder",
    "InterestExtractor",
    "RoutingInterests",
    "SelfAttentiveInterests",
    "SequenceEncoder",
]
