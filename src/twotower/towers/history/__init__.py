"""History encoders beyond pooling: a query's (B, L) recent item codes -> one (B, D) vector.

Each reads the history through the item-id embedding table it shares with the item
tower, and outputs that table's width D:

    attention.py    attention pooling with learned recency embeddings
    transformer.py  causal self-attention blocks (SASRec); the most recent position
    gru.py          a GRU from the oldest item (GRU4Rec); its last state
    interests.py    K interest vectors (B, K, D) for multi-interest query towers
    order.py        the orderings they share (padding moved to the end)

``mean`` and ``sum`` pooling are ``twotower.towers.encoders.PooledEncoder``.
"""

from __future__ import annotations

from torch import nn

from twotower.towers.history.attention import AttentionPooling
from twotower.towers.history.gru import GRUEncoder
from twotower.towers.history.interests import (
    INTEREST_EXTRACTORS,
    RoutingInterests,
    SelfAttentiveInterests,
)
from twotower.towers.history.transformer import CausalTransformer

HISTORY_ENCODERS: dict[str, type[nn.Module]] = {
    "attention": AttentionPooling,
    "transformer": CausalTransformer,
    "gru": GRUEncoder,
}

__all__ = [
    "HISTORY_ENCODERS",
    "INTEREST_EXTRACTORS",
    "AttentionPooling",
    "CausalTransformer",
    "GRUEncoder",
    "RoutingInterests",
    "SelfAttentiveInterests",
]
