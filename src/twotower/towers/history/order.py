"""The orderings every history encoder reads its (B, L) item codes in.

A history feature is (B, L) item codes, most recent first, 0 where there is no item.
Training may blank a code in the middle (``mask_target`` removes the target), so the
encoders first move the real codes to the front, keeping their order.
"""

from __future__ import annotations

import torch
from torch import nn


def most_recent_first(history: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, L) the real codes first, most recent first, then 0s; and (B,) their counts."""
    order = real_first(history)
    return history.gather(1, order), (history != 0).sum(dim=1)


def real_first(history: torch.Tensor) -> torch.Tensor:
    """(B, L) the permutation of each row that ``most_recent_first`` applies (for
    values aligned with the codes, such as their timestamps).

    A stable argsort of "is padding", written as the scatter of each position to its
    place: O(L), and a graph every exporter takes (ONNX has no stable sort).
    """
    real = history != 0
    count = real.sum(dim=1, keepdim=True)
    place = torch.where(real, real.cumsum(dim=1), count + (~real).cumsum(dim=1)) - 1
    j = torch.arange(history.shape[1], device=history.device).expand_as(history)
    return torch.zeros_like(place).scatter(1, place, j)


def oldest_first(history: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, L) the real codes oldest first, then 0s; and (B,) their counts.

    Position j of a row holds its j-th oldest item, whatever the padding: the same
    history padded to any length has the same real positions.
    """
    recent, lengths = most_recent_first(history)
    return reversed_real(recent, lengths), lengths


def reversed_real(codes: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """(B, L) each row's first ``lengths`` codes in reverse order, then 0s: most recent
    first <-> oldest first, the padding left at the end."""
    j = torch.arange(codes.shape[1], device=codes.device)  # (L,)
    source = (lengths[:, None] - 1 - j).clamp(min=0)  # (B, L)
    return torch.where(j < lengths[:, None], codes.gather(1, source), 0)


def last_real(outputs: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """(B, D) the output at each row's last real position of (B, L, D) oldest-first
    outputs; zeros for a row without items (as mean pooling of nothing gives)."""
    index = (lengths - 1).clamp(min=0)[:, None, None].expand(-1, 1, outputs.shape[2])
    last = outputs.gather(1, index).squeeze(1)  # (B, D)
    return torch.where(lengths[:, None] > 0, last, 0.0)


def scattered(values: torch.Tensor, real: torch.Tensor, fill: float) -> torch.Tensor:
    """(B, L, ...) ``values`` (R, ...) put back at the ``real`` (B, L) positions, in
    ``real.nonzero()`` order, ``fill`` elsewhere.

    The pooling encoders compute their per-item scores on the R real items only (a
    batch's histories are often mostly padding) and scatter them back for the
    softmax over each row.
    """
    out = values.new_full((*real.shape, *values.shape[1:]), fill)
    out[real] = values
    return out


def position_table(max_len: int, width: int) -> nn.Embedding:
    """``max_len`` learned position (or recency) vectors of ``width``, started at the
    item vectors' scale (N(0, 1/width) entries)."""
    table = nn.Embedding(max_len, width)
    nn.init.normal_(table.weight, std=width**-0.5)
    return table


def positions(length: int, max_len: int, device: torch.device) -> torch.Tensor:
    """(length,) position indices, the ones past ``max_len`` (padding only) clamped."""
    return torch.arange(length, device=device).clamp(max=max_len - 1)
