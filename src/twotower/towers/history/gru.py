"""A GRU over the history (GRU4Rec, Hidasi et al. 2016): its last state is the vector.

    e = item embeddings, oldest first                          (B, L, D)
    h_t = GRU(e_t, h_{t-1}), ``layers`` stacked                (B, L, D)
    out = h at the most recent item                            (B, D)

Rows are packed by length (``pack_padded_sequence``), so padding is never read.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from twotower.features.specs import HistoryFeature
from twotower.towers.history.order import last_real, oldest_first


class GRUEncoder(nn.Module):
    """(B, L) item codes, most recent first, 0-padded -> (B, D) the GRU's last state.

    Args:
        table: the shared item-id embedding table (D = its width).
        spec: the history feature (``layers``; ``dropout`` between layers).
    """

    interests = 1  # one vector per query, no timestamps (``SequenceEncoder``)
    times_input = None

    def __init__(self, table: nn.Embedding, spec: HistoryFeature) -> None:
        super().__init__()
        self.table = table
        self.width = table.embedding_dim
        dropout = spec.dropout if spec.layers > 1 else 0.0
        self.gru = nn.GRU(
            self.width, self.width, num_layers=spec.layers, batch_first=True, dropout=dropout
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        codes, lengths = oldest_first(x)  # (B, L), (B,)
        return last_real(self.sequence(self.table(codes), lengths), lengths)

    def sequence(self, items: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """(B, L, D) every position's state, of (B, L, D) oldest-first item embeddings of
        which each row's first ``lengths`` are real (0 past them).

        An exported graph (ONNX has no packed sequences) runs the GRU over the padding
        too: the states at real positions are the same, as padding only follows them.
        """
        if torch.compiler.is_exporting():
            states, _ = self.gru(items)
            real = torch.arange(items.shape[1], device=items.device) < lengths[:, None]
            return torch.where(real[:, :, None], states, 0.0)
        packed = pack_padded_sequence(
            items, lengths.clamp(min=1).cpu(), batch_first=True, enforce_sorted=False
        )
        states, _ = self.gru(packed)
        states, _ = pad_packed_sequence(states, batch_first=True, total_length=items.shape[1])
        return states
