"""A causal transformer over the history (SASRec, Kang & McAuley 2018).

    e = item embeddings, oldest first, + position embeddings    (B, L, D)
    blocks: h = h + Dropout(MHA(LN(h)))   causal: position t sees positions <= t
            h = h + Dropout(FFN(LN(h)))   (pre-norm), padded positions kept at 0
    out = LN(h)[last real position]                            (B, D)

Histories are right-padded oldest first, so with the causal mask a real position
never sees padding: the same history padded to any length gives the same vector, and
``sequence`` gives every prefix's output in one pass (position t encodes the history
up to item t).
"""

from __future__ import annotations

import torch
from torch import nn

from twotower.features.specs import HistoryFeature
from twotower.towers.history.order import last_real, oldest_first, position_table, positions


class CausalBlock(nn.Module):
    """One pre-norm block: causal multi-head self-attention, then a position-wise FFN."""

    def __init__(self, width: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.attention_norm = nn.LayerNorm(width)
        self.attention = nn.MultiheadAttention(width, heads, dropout=dropout, batch_first=True)
        self.ffn_norm = nn.LayerNorm(width)
        self.ffn = nn.Sequential(
            nn.Linear(width, width), nn.ReLU(), nn.Dropout(dropout), nn.Linear(width, width)
        )
        self.dropout = nn.Dropout(dropout)

    def forward(self, h: torch.Tensor, causal: torch.Tensor) -> torch.Tensor:
        """(B, L, D) -> (B, L, D); ``causal`` is (L, L) bool, True where attention is barred."""
        a = self.attention_norm(h)
        attended, _ = self.attention(a, a, a, attn_mask=causal, need_weights=False)
        h = h + self.dropout(attended)
        return h + self.dropout(self.ffn(self.ffn_norm(h)))


class CausalTransformer(nn.Module):
    """(B, L) item codes, most recent first, 0-padded -> (B, D): the output at the most
    recent item of causal self-attention blocks over the history, oldest first.

    Args:
        table: the shared item-id embedding table (D = its width).
        spec: the history feature (``max_len`` positions, ``layers``, ``heads``,
            ``dropout``).
    """

    interests = 1  # one vector per query, no timestamps (``SequenceEncoder``)
    times_input = None

    def __init__(self, table: nn.Embedding, spec: HistoryFeature) -> None:
        super().__init__()
        self.table = table
        self.width = table.embedding_dim
        self.max_len = spec.max_len
        self.position = position_table(spec.max_len, self.width)
        self.dropout = nn.Dropout(spec.dropout)
        self.blocks = nn.ModuleList(
            CausalBlock(self.width, spec.heads, spec.dropout) for _ in range(spec.layers)
        )
        self.norm = nn.LayerNorm(self.width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        codes, lengths = oldest_first(x)  # (B, L), (B,)
        return last_real(self.sequence(self.table(codes), lengths), lengths)

    def sequence(self, items: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """(B, L, D) every position's output, of (B, L, D) oldest-first item embeddings
        of which each row's first ``lengths`` are real."""
        L = items.shape[1]
        real = (torch.arange(L, device=items.device) < lengths[:, None])[..., None]  # (B, L, 1)
        h = self.dropout(items + self.position(positions(L, self.max_len, items.device))) * real
        causal = torch.triu(torch.ones(L, L, dtype=torch.bool, device=items.device), diagonal=1)
        for block in self.blocks:
            h = block(h, causal) * real
        return self.norm(h)
