"""Attention pooling: a learned weighting of the history's items, aware of recency.

    e_j = item embedding of the j-th most recent item          (B, L, D)
    k_j = e_j + p_j          p_j: learned recency embedding     (B, L, D)
    a_j = v . tanh(W k_j + b), masked to the real items          (B, L)
    out = sum_j softmax(a)_j e_j                                  (B, D)

Each item's weight depends on the item and on how recent it is, not on the padding:
the same history padded to any length gives the same vector.
"""

from __future__ import annotations

import torch
from torch import nn

from twotower.features.specs import HistoryFeature
from twotower.towers.history.order import most_recent_first, position_table, positions


class AttentionPooling(nn.Module):
    """(B, L) item codes, most recent first, 0-padded -> (B, D) attention-pooled vector.

    Args:
        table: the shared item-id embedding table (D = its width).
        spec: the history feature (``max_len`` recency embeddings).
    """

    def __init__(self, table: nn.Embedding, spec: HistoryFeature) -> None:
        super().__init__()
        self.table = table
        self.width = table.embedding_dim
        self.max_len = spec.max_len
        self.recency = position_table(spec.max_len, self.width)
        self.project = nn.Linear(self.width, self.width)
        self.score = nn.Linear(self.width, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        codes, lengths = most_recent_first(x)  # (B, L), (B,)
        real = torch.arange(x.shape[1], device=x.device) < lengths[:, None]  # (B, L)
        items = self.table(codes)  # (B, L, D)
        keys = items + self.recency(positions(x.shape[1], self.max_len, x.device))
        logits = self.score(torch.tanh(self.project(keys))).squeeze(-1)  # (B, L)
        logits = logits.masked_fill(~real, torch.finfo(logits.dtype).min)
        weights = torch.softmax(logits, dim=1) * real  # a row without items: all 0
        return (weights[..., None] * items).sum(dim=1)
