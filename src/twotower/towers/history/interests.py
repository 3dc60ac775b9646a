"""Multi-interest extractors: a query's (B, L) recent item codes -> K (B, K, D) interests.

A user rarely has one taste. Averaging a history that mixes, say, documentaries and
cartoons gives a vector near neither; K interest vectors can each sit near one. The
query tower combines each interest with the query's other features (the tower
network runs once per interest) and outputs K unit vectors; training scores a
positive with the interest closest to it (label-aware selection,
``twotower.towers.model.select_interests``) and retrieval merges what each interest
finds (``Index.search_interests``).

Two extractors, both reading the item-id table shared with the item tower:

    self_attention   ComiRec-SA (Cen et al. 2020): K attention heads over the items
                     and their recency; interest k is the items weighted by head k.
        a = W2 tanh(W1 (e_j + p_j))          (B, L, K), masked to the real items
        interest_k = sum_j softmax_j(a)_jk e_j

    routing          dynamic routing (MIND, Li et al. 2019; ComiRec-DR): each item
                     votes for every interest through that interest's own map S_k, and
                     for a few iterations sends more of its weight to the interests its
                     votes agree with.
        u_kj = S_k e_j;  b = 0
        repeat: w = softmax_k(b) (masked);  v_k = squash(sum_j w_kj u_kj);  b_kj += u_kj . v_k

Routing starts from zero logits and breaks the symmetry between interests with their
separate maps, not with MIND's random initial logits, so a query's vectors are the
same on every call (serving needs that). MIND's adaptive number of interests is not
used: every query has K. Rows without history give K zero interests (the tower then
sees only the other features, so the K vectors coincide).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from twotower.features.specs import HistoryFeature
from twotower.towers.history.order import (
    most_recent_first,
    position_table,
    positions,
    scattered,
)


class InterestExtractor(nn.Module):
    """What every extractor declares (``HistoryEncoder``): K = ``spec.interests``
    vectors of the shared table's width D, read from the codes alone.

    Args:
        table: the shared item-id embedding table (D = its width).
        spec: the history feature.
    """

    times_input = None  # reads no timestamps

    def __init__(self, table: nn.Embedding, spec: HistoryFeature) -> None:
        super().__init__()
        self.table = table
        self.width = table.embedding_dim
        self.interests = spec.interests


class SelfAttentiveInterests(InterestExtractor):
    """(B, L) item codes, most recent first, 0-padded -> (B, K, D) ComiRec-SA interests.

    Args:
        table: the shared item-id embedding table (D = its width).
        spec: the history feature (``interests`` K, ``max_len`` recency embeddings).
    """

    def __init__(self, table: nn.Embedding, spec: HistoryFeature) -> None:
        super().__init__(table, spec)
        self.max_len = spec.max_len
        self.recency = position_table(spec.max_len, self.width)
        self.project = nn.Linear(self.width, 4 * self.width, bias=False)  # ComiRec's 4 D
        self.heads = nn.Linear(4 * self.width, spec.interests, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        codes, lengths = most_recent_first(x)  # (B, L), (B,)
        real = torch.arange(x.shape[1], device=x.device) < lengths[:, None]  # (B, L)
        # the R real items alone are scored; lookups, never indexing with repeats, so
        # the backward pass sums in a fixed order (resuming stays exact)
        packed = self.table(codes[real])  # (R, D)
        at = positions(x.shape[1], self.max_len, x.device).expand_as(codes)[real]  # (R,)
        scores = self.heads(torch.tanh(self.project(packed + self.recency(at))))  # (R, K)
        logits = scattered(scores, real, torch.finfo(scores.dtype).min)  # (B, L, K)
        weights = torch.softmax(logits, dim=1) * real[..., None]  # a row without items: 0
        return torch.einsum("blk,bld->bkd", weights, scattered(packed, real, 0.0))


class RoutingInterests(InterestExtractor):
    """(B, L) item codes, most recent first, 0-padded -> (B, K, D) routed interests.

    Args:
        table: the shared item-id embedding table (D = its width).
        spec: the history feature (``interests`` K, ``routing_iterations``).
    """

    def __init__(self, table: nn.Embedding, spec: HistoryFeature) -> None:
        super().__init__(table, spec)
        self.iterations = spec.routing_iterations
        self.maps = nn.Linear(self.width, spec.interests * self.width, bias=False)  # S_1..S_K

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        codes, lengths = most_recent_first(x)  # (B, L), (B,)
        B, L = codes.shape
        real = torch.arange(L, device=x.device) < lengths[:, None]  # (B, L)
        rows = real.nonzero()[:, 0]  # (R,) the row of each real item: only these route
        votes = self.maps(self.table(codes[real])).view(-1, self.interests, self.width)
        logits = votes.new_zeros(len(votes), self.interests)  # (R, K): b_kj
        for iteration in range(self.iterations):
            weights = torch.softmax(logits, dim=1)  # each item spreads over the K
            last = iteration == self.iterations - 1
            # as in ComiRec-DR: gradients flow through the last iteration's votes only
            routed = votes if last else votes.detach()  # (R, K, D): u_kj
            summed = votes.new_zeros(B, self.interests, self.width)
            summed = summed.index_add(0, rows, weights[..., None] * routed)  # (B, K, D)
            capsules = squash(summed)
            if not last:  # agreement, each item with its row's capsules (a lookup)
                mine = F.embedding(rows, capsules.flatten(1)).view_as(routed)  # (R, K, D)
                logits = logits + (routed * mine).sum(dim=-1)
        return capsules


def squash(z: torch.Tensor) -> torch.Tensor:
    """The capsule nonlinearity |z|^2 / (1 + |z|^2) z / |z| on the last axis (0 at 0)."""
    squared = (z * z).sum(dim=-1, keepdim=True)
    return z * (squared / (1 + squared) / torch.sqrt(squared + 1e-12))
