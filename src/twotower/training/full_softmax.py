"""The full softmax: each row's positive against every item of the corpus, exactly, and
the training pairs it can leave out.

The item tower runs once per step on every item; the scores are made all at once or a
chunk of rows at a time (activation checkpointing), with the same loss either way.
``objectives.build_objective`` builds it for ``objective: {kind: full}``.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from twotower.losses import MultiPositiveSoftmax

# (M,) item indices -> (M, D) item vectors, through the item tower.
EmbedItems = Callable[[torch.Tensor], torch.Tensor]

# (S,) rows and (S,) items: row at[s] leaves item items[s] out of its softmax.
SeenItems = tuple[torch.Tensor, torch.Tensor]


class KnownPairs:
    """The (query, item) pairs of the training interactions, for membership tests.

    Kept as one sorted int64 key per pair, ``query * N + item``, so a (B, M) test is
    one ``searchsorted``.

    Args:
        queries, items: (rows,) the training interactions' query and item indices.
        num_items: N.
    """

    def __init__(self, queries: torch.Tensor, items: torch.Tensor, num_items: int) -> None:
        self.num_items = num_items
        self.keys = torch.unique(queries.long() * num_items + items.long())  # sorted

    def __call__(self, queries: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        """(B, M) bool: whether item ``items[j]`` (or ``items[b, j]``, for (B, M) items
        of each row's own) is a training positive of ``queries[b]``."""
        keys = self._on(queries.device)
        items = items.long() if items.dim() == 2 else items.long()[None, :]
        wanted = queries.long()[:, None] * self.num_items + items  # (B, M)
        at = torch.searchsorted(keys, wanted).clamp(max=max(len(keys) - 1, 0))
        return keys[at] == wanted if len(keys) else torch.zeros_like(wanted, dtype=torch.bool)

    def rows(self, queries: torch.Tensor) -> torch.Tensor:
        """(B, N) bool: row b marks every training positive of ``queries[b]``; the same
        as ``self(queries, arange(N))`` at the cost of the queries' pairs, not B x N
        searches (for the full softmax, whose candidates are every item)."""
        keys, n = self._on(queries.device), self.num_items
        first = queries.long() * n  # each query's keys lie in [q N, (q + 1) N)
        starts = torch.searchsorted(keys, first)
        counts = torch.searchsorted(keys, first + n) - starts  # (B,)
        row = torch.repeat_interleave(torch.arange(len(queries), device=keys.device), counts)
        # the k-th key of row b sits at starts[b] + k
        within = torch.arange(len(row), device=keys.device) - (counts.cumsum(0) - counts)[row]
        found = torch.zeros(len(queries), n, dtype=torch.bool, device=keys.device)
        found[row, keys[starts[row] + within] - first[row]] = True
        return found

    def _on(self, device: torch.device) -> torch.Tensor:
        """The keys on ``device``, moved there once."""
        if self.keys.device != device:
            self.keys = self.keys.to(device)
        return self.keys


class FullSoftmax(nn.Module):
    """Softmax over the whole corpus: each row's positive against every item, exactly.

    Each step runs the item tower once on every item; the (B, N) scores are then
    computed all at once, or ``chunk_rows`` rows at a time, each chunk's scores made
    again in the backward pass (activation checkpointing): a step then holds
    ``chunk_rows`` x N scores, not B x N, at the cost of a second (chunk, D) x (D, N)
    product per chunk. The loss and its gradient are the same either way.

    Args:
        num_items: N; every step embeds items 0..N-1 through the item tower.
        known: if given, each row's query's other training positives are masked.
        positives_compete: in ``sets``, a row's positives are not masked from one
            another's softmax (``FullConfig.positives_compete``).
        chunk_rows: rows scored at once; None: all of them.
        held_out: (M,) items held out of training (``Split.held_out_items``): in no
            row's softmax, as items that do not exist yet when the model trains; else
            every step would push them down, and a model would learn their features
            only as those of items no one picks.
    """

    def __init__(
        self,
        num_items: int,
        known: KnownPairs | None = None,
        positives_compete: bool = False,
        chunk_rows: int | None = None,
        held_out: np.ndarray | None = None,
    ) -> None:
        super().__init__()
        self.num_items = num_items
        self.known = known
        self.positives_compete = positives_compete
        self.chunk_rows = chunk_rows
        self.loss = MultiPositiveSoftmax()  # every item a candidate: the full softmax
        outside = None
        if held_out is not None and len(held_out):
            outside = torch.zeros(num_items, dtype=torch.bool)
            outside[torch.as_tensor(held_out, dtype=torch.int64)] = True
        # (N,) bool, on the objective's device; not state: the split gives it again
        self.register_buffer("outside", outside, persistent=False)

    def forward(
        self,
        query: torch.Tensor,
        positives: torch.Tensor,
        embed_items: EmbedItems,
        scale: torch.Tensor,
        generator: torch.Generator,
        weights: torch.Tensor | None = None,
        queries: torch.Tensor | None = None,
        seen: SeenItems | None = None,
    ) -> torch.Tensor:
        """The loss of (B, D) query vectors against their (B,) positive items, each row
        weighted by ``weights`` (B,) if given; ``queries`` (B,) are the rows' query
        indices, which masking known positives needs; ``seen``: items left out of
        each row's softmax (sequence training's ``mask_seen``). ``sets`` with one
        positive a row."""
        rows = torch.arange(len(positives), device=positives.device)
        return self.sets(query, positives, rows, embed_items, scale, weights, queries, seen)

    def sets(
        self,
        query: torch.Tensor,
        positives: torch.Tensor,
        owners: torch.Tensor,
        embed_items: EmbedItems,
        scale: torch.Tensor,
        weights: torch.Tensor | None = None,
        queries: torch.Tensor | None = None,
        seen: SeenItems | None = None,
    ) -> torch.Tensor:
        """The loss of (B, D) query vectors against (P,) positives, positive p belonging
        to row ``owners[p]``: what ``forward`` gives with each positive its own row
        (``query[owners]``, ``queries[owners]``), from one (B, N) score matrix.

        Each positive's term is ``-log softmax`` of its score among every item (with
        ``known``: among itself and the items that are not training positives of the
        row's query; with ``positives_compete`` also among the row's other positives;
        with ``seen``: among the items not seen by its row, and itself); the loss is
        their mean, weighted by ``weights`` (P,) if given.
        """
        items = embed_items(torch.arange(self.num_items, device=positives.device))  # (N, D)
        if not len(positives):  # a rank's empty share of a global batch: 0, graph kept
            return (query.sum() + items.sum()) * scale * 0.0
        if self.known is not None and queries is None:
            raise ValueError("masking known positives needs each row's query")
        chunk = self.chunk_rows or len(query)
        terms, order = [], []
        for start in range(0, len(query), chunk):
            rows = slice(start, start + chunk)
            mine = torch.nonzero((owners >= start) & (owners < rows.stop)).squeeze(1)  # (P_c,)
            if not len(mine):
                continue
            part = (rows, owners[mine] - start, positives[mine], queries, seen)
            if self.chunk_rows is None:
                terms.append(self._terms(query, items, scale, *part))
            else:  # the (chunk, N) scores are made again in backward, not kept
                terms.append(
                    checkpoint(self._terms, query[rows], items, scale, *part, use_reentrant=False)
                )
            order.append(mine)
        weights = None if weights is None else weights[torch.cat(order)]
        return self.loss.mean(torch.cat(terms), weights)

    def _terms(
        self,
        query: torch.Tensor,
        items: torch.Tensor,
        scale: torch.Tensor,
        rows: slice,
        owners: torch.Tensor,
        positives: torch.Tensor,
        queries: torch.Tensor | None,
        seen: SeenItems | None,
    ) -> torch.Tensor:
        """(P_c,) the terms of the positives of ``rows``: (R, D) ``query`` (those rows)
        against (N, D) ``items``, ``owners`` counted from ``rows.start``."""
        logits = query @ items.T * scale  # (R, N)
        exclude = self._exclude(rows, len(logits), owners, positives, queries, seen)
        return self.loss.terms(logits, positives, owners, exclude)

    def _exclude(
        self,
        rows: slice,
        count: int,
        owners: torch.Tensor,
        positives: torch.Tensor,
        queries: torch.Tensor | None,
        seen: SeenItems | None,
    ) -> torch.Tensor | None:
        """(count, N) bool: the items left out of the softmax of ``rows`` (``count`` of
        them), whose (P_c,) positives are ``positives``, in rows ``owners`` (counted
        from ``rows.start``); None: none."""
        exclude = None
        if self.known is not None:
            assert queries is not None
            exclude = self.known.rows(queries[rows])
            if self.positives_compete:
                exclude[owners, positives] = False
        if self.outside is not None:
            outside = self.outside.expand(count, -1)  # (count, N)
            exclude = outside.clone() if exclude is None else exclude | outside
        if seen is not None:
            at, items = seen
            mine = (at >= rows.start) & (at < rows.start + count)
            if exclude is None:
                exclude = torch.zeros(count, self.num_items, dtype=torch.bool, device=at.device)
            exclude[at[mine] - rows.start, items[mine]] = True
        return exclude


def embed_unique(items: torch.Tensor, embed_items: EmbedItems) -> torch.Tensor:
    """(M, D) vectors of (M,) item ids, running each distinct item through the tower once."""
    unique, inverse = torch.unique(items, return_inverse=True)
    return embed_items(unique).index_select(0, inverse)
