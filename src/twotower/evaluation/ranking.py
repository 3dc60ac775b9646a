"""Evaluation by exact full-corpus ranking: every query scored against every item.

The ranking is the index's exact, tie-deterministic ``twotower.index.topk.top_k``
(equal scores go to the lower item index), so the metrics do not depend on the chunk
size; a progress bar counts the ranked queries on a terminal.

Seen-item filtering (``exclude_seen=True``): the items a query already interacted
with before the evaluated part (train for ``valid``; train + valid for ``test``) are
removed from its ranking, *and* from its held-out items. A re-consumed item can then
never be retrieved, so counting it as a miss would only lower every model's score by
the same unreachable amount. A query with no held-out item left is not evaluated.

New items (``split.new_items``): beside the part's metrics, the same metrics of the
same rankings with each query's held-out items restricted to the new items, over the
queries that have any (``test/new_items/recall@10``, ..., ``test/new_items/queries``):
how well a model places items it never trained on, among the whole corpus; and
restricted to the other items (``test/known_items/...``), which the part's metrics
mix with the new ones.

With ``groups`` (``evaluate``) or ``item_counts`` (``evaluate_chunks``) the metrics are
also reported by item popularity and query activity (``twotower.evaluation.groups``),
both read from the interactions known before the part; ``QueryMetrics`` keeps each
evaluated query's own metrics.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence
from typing import Literal

import numpy as np
import pyarrow as pa
import scipy.sparse as sp
import torch
from tqdm.auto import tqdm

from twotower.data.matrix import interaction_matrix, known_before
from twotower.data.splits import Split, check_held_out
from twotower.evaluation.metrics import RankingTotals
from twotower.evaluation.per_query import QueryMetrics
from twotower.index.topk import ScoreFn, top_k


@dataclasses.dataclass(frozen=True)
class HeldOut:
    """Queries to rank, as rows of two matrices.

    Attributes:
        score_fn: (B,) row indices -> (B, N) scores of every item.
        held_out: (rows, N) binary CSR: each row's held-out items.
        seen: (rows, N) binary CSR: the items each row knew before the part.
        ids: (rows,) each row's query id, for ``QueryMetrics``; None: the rows are
            numbered in the order they come, from 0.
    """

    score_fn: ScoreFn
    held_out: sp.csr_matrix
    seen: sp.csr_matrix
    ids: pa.Array | pa.ChunkedArray | np.ndarray | None = None


def evaluate(
    score_fn: ScoreFn,
    split: Split,
    part: str,
    num_queries: int,
    num_items: int,
    ks: Sequence[int] = (10, 50, 100),
    exclude_seen: bool = True,
    chunk_size: int = 1024,
    item_popularity: np.ndarray | Literal["known"] | None = None,
    groups: bool = False,
) -> dict[str, float]:
    """Full-corpus ranking metrics of ``score_fn`` on one held-out part.

    Args:
        score_fn: (B,) query indices -> (B, N) scores of every item.
        split: the train / valid / test interactions.
        part: ``"valid"`` or ``"test"``: whose items are held out.
        num_queries: number of queries (rows of the interaction matrices).
        num_items: N, the size of the corpus.
        ks: the cutoffs; the ranking keeps ``max(ks)`` items.
        exclude_seen: remove seen items from the rankings and from the held-out
            items (see the module docstring).
        chunk_size: queries scored at once.
        item_popularity: (N,) counts, or ``"known"`` for the interactions known
            before ``part`` (train; train + valid for test); adds ``popularity@k``.
        groups: add the metrics by group, ``"{part}/groups/..."``, the groups read from
            the interactions known before ``part``.

    Returns:
        ``{"{part}/{metric}@{k}": value, ..., "{part}/queries": evaluated count}``; the
        metrics are those of ``twotower.evaluation.metrics.ranking_metrics``. With
        the split's new items in ``part``, the same under ``{part}/new_items/``.
    """
    check_held_out(part)
    held_out = interaction_matrix(split.part(part), num_queries, num_items)
    seen = known_before(split, part, num_queries, num_items)
    known = np.asarray(seen.sum(axis=0), dtype=np.float32).ravel()
    if isinstance(item_popularity, str):
        item_popularity = known
    return evaluate_chunks(
        [HeldOut(score_fn, held_out, seen)],
        part,
        num_items,
        ks,
        exclude_seen,
        chunk_size,
        item_popularity,
        item_counts=known if groups else None,
        new_items=split.new_items_in(part),
    )


def evaluate_chunks(
    chunks: Iterable[HeldOut],
    part: str,
    num_items: int,
    ks: Sequence[int] = (10, 50, 100),
    exclude_seen: bool = True,
    chunk_size: int = 1024,
    item_popularity: np.ndarray | None = None,
    total: int | None = None,
    item_counts: np.ndarray | None = None,
    per_query: QueryMetrics | None = None,
    new_items: np.ndarray | None = None,
) -> dict[str, float]:
    """``evaluate`` over queries that come chunk by chunk (e.g. read from disk), in
    memory bounded by the corpus and a chunk: the same metrics as one call over all
    of them (up to the order of float sums).

    Args:
        chunks: the queries to rank, a ``HeldOut`` at a time.
        total: the queries to come, for the progress bar, if known.
        item_counts: (N,) each item's interactions known before the part; adds the
            metrics by group (the queries' counts are their rows of ``seen``).
        per_query: where each evaluated query's own metrics are kept, if given.
        new_items: (M,) the items held out of training (``Split.new_items_in``): adds
            ``{part}/new_items/...`` and ``{part}/known_items/...`` (module doc).
        part, num_items, ks, exclude_seen, chunk_size, item_popularity: as ``evaluate``'s
            (a popularity must be given as counts).
    """
    totals = RankingTotals(ks, num_items, item_popularity, item_counts)
    k = max(ks, default=1)  # an empty ks is rejected by RankingTotals above
    alone = _ItemsAlone.new_and_known(new_items, ks, num_items, item_popularity)
    evaluated = offset = 0
    bar = tqdm(total=total, desc="ranking", unit="query", leave=False, disable=None)
    with bar:
        for chunk in chunks:
            held_out = chunk.held_out
            if exclude_seen:
                held_out = (held_out - held_out.multiply(chunk.seen)).tocsr()
                held_out.eliminate_zeros()
            queries = np.flatnonzero(np.diff(held_out.indptr) > 0)
            exclude = chunk.seen if exclude_seen else None
            score = _counted(chunk.score_fn, bar)
            ranked, _ = top_k(score, queries, k, exclude, chunk_size, num_items)
            counts = np.diff(chunk.seen.indptr)[queries]
            rows = totals.add(ranked, held_out[queries], counts)
            if per_query is not None:
                ids = _ids(chunk.ids, queries[rows.rows], offset)
                per_query.add(ids, counts[rows.rows], rows)
            for restricted in alone.values():
                restricted.add(ranked, held_out[queries])
            evaluated += len(queries)
            offset += held_out.shape[0]
    if per_query is not None:
        per_query.end_part(part)
    result = {f"{part}/{name}": value for name, value in totals.result().items()}
    result[f"{part}/queries"] = evaluated
    for name, restricted in alone.items():
        result |= restricted.result(f"{part}/{name}")
    return result


class _ItemsAlone:
    """The metrics of the rankings with each row's held-out items restricted to some
    items (rows with none are not counted), added as ``evaluate_chunks`` ranks.

    Args:
        items: (N,) bool: the items kept.
    """

    def __init__(self, items: np.ndarray, ks: Sequence[int], popularity: np.ndarray | None) -> None:
        # (N, N) diagonal: keeps the items' columns
        self.columns = sp.diags(items.astype(np.float32), format="csr")
        self.totals = RankingTotals(ks, len(items), popularity)

    @classmethod
    def new_and_known(
        cls,
        new_items: np.ndarray | None,
        ks: Sequence[int],
        num_items: int,
        popularity: np.ndarray | None,
    ) -> dict[str, _ItemsAlone]:
        """``new_items`` alone and the other items alone, by the names their metrics
        take (``new_items``, ``known_items``); none without new items."""
        if new_items is None:
            return {}
        new = np.zeros(num_items, dtype=bool)
        new[new_items] = True
        return {"new_items": cls(new, ks, popularity), "known_items": cls(~new, ks, popularity)}

    def add(self, ranked: np.ndarray, held_out: sp.csr_matrix) -> None:
        self.totals.add(ranked, (held_out @ self.columns).tocsr())

    def result(self, prefix: str) -> dict[str, float]:
        result = {f"{prefix}/{name}": value for name, value in self.totals.result().items()}
        result[f"{prefix}/queries"] = self.totals.rows
        return result


def _ids(
    ids: pa.Array | pa.ChunkedArray | np.ndarray | None, rows: np.ndarray, offset: int
) -> pa.Array:
    """The query ids of a chunk's ``rows``; without ids, the rows' numbers counted
    from ``offset`` (the rows of the chunks before)."""
    if ids is None:
        return pa.array(offset + rows.astype(np.int64))
    if isinstance(ids, np.ndarray):
        return pa.array(ids[rows])
    taken = ids.take(pa.array(rows, type=pa.int64()))
    return taken.combine_chunks() if isinstance(taken, pa.ChunkedArray) else taken


def _counted(score_fn: ScoreFn, bar: tqdm) -> ScoreFn:
    """``score_fn``, advancing ``bar`` by the queries of each chunk it scores."""

    def score(chunk: np.ndarray) -> torch.Tensor:
        scores = score_fn(chunk)
        bar.update(len(chunk))
        return scores

    return score
