"""Attention pooling: a learned weighting of the history's items, aware of recency.

    e_j = item embedding of the j-th most recent item          (B, L, D)
    k_j = e_j + p_j (+ g_j)  p_j: learned recency embedding     (B, L, D)
    a_j = v . tanh(W k_j + b), masked to the real items          (B, L)
    out = sum_j softmax(a)_j e_j                                  (B, D)

With ``time_buckets``, g_j embeds the item's time gap to the most recent item, t_1 -
t_j, bucketed as floor(log2(1 + gap / time_unit)) (the last bucket open-ended): the
same five items read as one evening's session or as five years apart. The gap is to
the history's own latest item, not to the moment of the query, so training (the
history before each example) and serving (the history up to now) measure it alike.

Each item's weight depends on the item and on how recent it is, not on the padding:
the same history padded to any length gives the same vector.
"""

from __future__ import annotations

import torch
from torch import nn

from twotower.features.specs import HistoryFeature
from twotower.towers.history.order import position_table, positions, real_first, scattered


class AttentionPooling(nn.Module):
    """(B, L) item codes, most recent first, 0-padded -> (B, D) attention-pooled vector.

    Args:
        table: the shared item-id embedding table (D = its width).
        spec: the history feature (``max_len`` recency embeddings; ``time_buckets``).

    Attributes:
        times_input: the model input of the items' timestamps, when time gaps are read.
    """

    interests = 1  # one vector per query (``HistoryEncoder``)

    def __init__(self, table: nn.Embedding, spec: HistoryFeature) -> None:
        super().__init__()
        self.table = table
        self.width = table.embedding_dim
        self.max_len = spec.max_len
        self.recency = position_table(spec.max_len, self.width)
        self.project = nn.Linear(self.width, self.width)
        self.score = nn.Linear(self.width, 1, bias=False)
        self.time_buckets, self.time_unit = spec.time_buckets, spec.time_unit
        self.times_input = spec.times_input if spec.time_buckets else None
        self.gaps = position_table(spec.time_buckets, self.width) if spec.time_buckets else None

    def forward(self, x: torch.Tensor, times: torch.Tensor | None = None) -> torch.Tensor:
        """(B, L) codes (and, with time gaps, their (B, L) timestamps) -> (B, D)."""
        order = real_first(x)
        codes, lengths = x.gather(1, order), (x != 0).sum(dim=1)  # (B, L), (B,)
        real = torch.arange(x.shape[1], device=x.device) < lengths[:, None]  # (B, L)
        # the R real items alone are scored; lookups, never indexing with repeats, so
        # the backward pass sums in a fixed order (resuming stays exact)
        packed = self.table(codes[real])  # (R, D)
        at = positions(x.shape[1], self.max_len, x.device).expand_as(codes)[real]  # (R,)
        keys = packed + self.recency(at)
        if self.gaps is not None:
            if times is None:
                raise ValueError(f"attention with time_buckets needs {self.times_input!r}")
            times = times.gather(1, order)
            gaps = (times[:, :1] - times).clamp(min=0) / self.time_unit  # to the latest
            buckets = torch.log2(1 + gaps).floor().clamp(max=self.time_buckets - 1)
            keys = keys + self.gaps(buckets[real].long())
        scores = self.score(torch.tanh(self.project(keys))).squeeze(-1)  # (R,)
        logits = scattered(scores, real, torch.finfo(scores.dtype).min)  # (B, L)
        weights = torch.softmax(logits, dim=1) * real  # a row without items: all 0
        return (weights[..., None] * scattered(packed, real, 0.0)).sum(dim=1)
