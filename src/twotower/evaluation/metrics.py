"""Top-k ranking metrics as pure, vectorized functions of (ranked ids, relevant ids).

Notation: row q ranks items ``ranked[q]`` best first (rank i starts at 1; -1 pads a
row that had fewer candidates); R is the row's set of relevant (held-out) items;
rel(i) = 1 if the item at rank i is in R, else 0 (padding is never relevant);
hits@k = sum_{i<=k} rel(i); N is the number of items.

    recall@k     = hits@k / |R|
    hr@k         = 1 if hits@k > 0 else 0
    ndcg@k       = DCG@k / IDCG@k, DCG@k = sum_{i<=k} rel(i) / log2(i + 1),
                   IDCG@k = sum_{i<=min(k, |R|)} 1 / log2(i + 1)
    mrr@k        = 1 / (rank of the first hit) if that rank is <= k, else 0
    precision@k  = hits@k / k  (a padded slot counts as a miss)
    coverage@k   = |union over counted rows of their top-k items| / N
    popularity@k = mean of item_popularity over the row's top-k items (0 if it has none)

Rows with an empty R are not counted. Every metric except coverage is the mean over
counted rows; coverage is one number for all of them. With no counted row the means
are NaN and coverage is 0. The items within a row of ``ranked`` are assumed distinct.

Given training counts, every metric is also computed by item popularity and query
activity group (``twotower.evaluation.groups``), under ``groups/...`` keys.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence

import numpy as np
import scipy.sparse as sp

from twotower.evaluation.groups import GroupTotals


def ranking_metrics(
    ranked: np.ndarray,
    relevant: sp.csr_matrix,
    ks: Sequence[int],
    item_popularity: np.ndarray | None = None,
    item_counts: np.ndarray | None = None,
    query_counts: np.ndarray | None = None,
) -> dict[str, float]:
    """Computes every metric at every cutoff in one pass (definitions in the module doc).

    Args:
        ranked: (Q, K_max) int64 item indices, best first, -1 for padding. A cutoff k
            larger than K_max treats the missing slots as padding.
        relevant: (Q, N) binary CSR; row q holds the relevant items of ``ranked[q]``.
        ks: the cutoffs, each >= 1.
        item_popularity: (N,) a popularity per item (e.g. train counts); adds
            ``popularity@k`` when given.
        item_counts: (N,) training interactions per item; with ``query_counts``, adds
            the metrics by group (``twotower.evaluation.groups``).
        query_counts: (Q,) training interactions per row, for the query groups.

    Returns:
        ``{"recall@k": ..., "hr@k": ..., "ndcg@k": ..., "mrr@k": ..., "precision@k": ...,
        "coverage@k": ..., ["popularity@k": ...], ["groups/...": ...]}`` for each k in
        ``ks``.

    Raises:
        ValueError: shapes disagree, an item index is out of range, a k is < 1, or
            item counts come without query counts.
    """
    totals = RankingTotals(ks, relevant.shape[1], item_popularity, item_counts)
    totals.add(ranked, relevant, query_counts)
    return totals.result()


@dataclasses.dataclass(frozen=True)
class RowMetrics:
    """The rows of a chunk that were counted, and their metrics.

    Attributes:
        rows: (Qc,) the counted rows' positions in the chunk.
        held_out: (Qc,) their numbers of relevant items.
        values: ``{"metric@k": (Qc,) values}``, every metric but coverage.
    """

    rows: np.ndarray
    held_out: np.ndarray
    values: dict[str, np.ndarray]


class RankingTotals:
    """The metrics of rows ranked chunk by chunk: ``add`` each chunk, then ``result``,
    which equals ``ranking_metrics`` of all the rows at once (up to the order of float
    sums), in memory bounded by the corpus, not by the rows.

    Args:
        ks: the cutoffs, each >= 1.
        num_items: N, the corpus size.
        item_popularity: (N,) a popularity per item; adds ``popularity@k``.
        item_counts: (N,) training interactions per item; adds the metrics by group
            (every ``add`` then needs its rows' query counts).
    """

    def __init__(
        self,
        ks: Sequence[int],
        num_items: int,
        item_popularity: np.ndarray | None = None,
        item_counts: np.ndarray | None = None,
    ) -> None:
        self.ks = _checked_ks(ks)
        self.num_items = num_items
        self.item_popularity = _per_item(item_popularity, num_items, "item_popularity")
        item_counts = _per_item(item_counts, num_items, "item_counts")
        self.groups = None
        if item_counts is not None:
            per_row = functools.partial(row_metrics, ks=self.ks)
            self.groups = GroupTotals(self.ks, item_counts, per_row)
        self.rows = 0
        self.sums: dict[str, float] = {}
        # coverage@k counts the items whose best position over all rows is < k
        self.best_position = np.full(num_items, np.iinfo(np.int64).max, dtype=np.int64)

    def add(
        self, ranked: np.ndarray, relevant: sp.csr_matrix, query_counts: np.ndarray | None = None
    ) -> RowMetrics:
        """Counts a chunk: ``ranked`` (Q, K_max) and its rows' ``relevant`` (Q, N)
        items, as ``ranking_metrics`` takes them, and (Q,) ``query_counts``, the rows'
        training interactions (needed with item counts). Returns the counted rows'
        metrics."""
        relevant = _canonical(relevant)
        if relevant.shape[1] != self.num_items:
            raise ValueError(f"relevant must have {self.num_items} columns, got {relevant.shape}")
        ranked = _checked_ranked(ranked, relevant.shape, self.ks)
        num_relevant = np.diff(relevant.indptr)
        rows = np.flatnonzero(num_relevant > 0)
        ranked = ranked[rows]
        hits = np.nonzero(_hits(ranked, rows, relevant))  # (H,) rows and ranks of the hits
        values = self._row_values(ranked, hits, num_relevant[rows])
        present = ranked >= 0
        positions = np.broadcast_to(np.arange(ranked.shape[1]), ranked.shape)
        np.minimum.at(self.best_position, ranked[present], positions[present])
        for name, row_values in values.items():
            self.sums[name] = self.sums.get(name, 0.0) + float(np.sum(row_values))
        if self.groups is not None:
            counts = _query_counts(query_counts, len(num_relevant))[rows]
            self.groups.add(ranked, hits, relevant[rows], counts, values)
        self.rows += len(rows)
        return RowMetrics(rows, num_relevant[rows], values)

    def _row_values(
        self, ranked: np.ndarray, hits: tuple[np.ndarray, np.ndarray], num_relevant: np.ndarray
    ) -> dict[str, np.ndarray]:
        """Each row's value of every metric but coverage at every cutoff, k by k."""
        values = row_metrics(*hits, num_relevant, self.ks)
        if self.item_popularity is None:
            return values
        values |= _popularity(ranked, self.item_popularity, self.ks)
        return {f"{name}@{k}": values[f"{name}@{k}"] for k in self.ks for name in _names(values)}

    def result(self) -> dict[str, float]:
        """Every metric at every cutoff over the rows added (see the module doc)."""
        result: dict[str, float] = {}
        for k in self.ks:
            names = ["recall", "hr", "ndcg", "mrr", "precision"]
            names += ["popularity"] if self.item_popularity is not None else []
            for name in names:
                total = self.sums.get(f"{name}@{k}", 0.0)
                result[f"{name}@{k}"] = total / self.rows if self.rows else float("nan")
            covered = int(np.count_nonzero(self.best_position < k))
            result[f"coverage@{k}"] = covered / max(self.num_items, 1)
        if self.groups is not None:
            result.update(self.groups.result(self.best_position))
        return result


def _names(values: dict[str, np.ndarray]) -> list[str]:
    """The metric names of ``{"name@k": ...}`` keys, in their first order."""
    return list(dict.fromkeys(key.split("@")[0] for key in values))


def _per_item(values: np.ndarray | None, num_items: int, name: str) -> np.ndarray | None:
    """``values`` as (N,) float64, checked; None stays None."""
    if values is None:
        return None
    values = np.asarray(values, dtype=np.float64)
    if values.shape != (num_items,):
        raise ValueError(f"{name} must have shape ({num_items},)")
    return values


def _query_counts(query_counts: np.ndarray | None, rows: int) -> np.ndarray:
    """(rows,) int64 training counts, checked: the query groups need one per row."""
    if query_counts is None:
        raise ValueError("metrics by group need query_counts, one per row")
    counts = np.asarray(query_counts, dtype=np.int64)
    if counts.shape != (rows,) or (rows and counts.min() < 0):
        raise ValueError(f"query_counts must be ({rows},) counts >= 0, got {counts.shape}")
    return counts


def _canonical(relevant: sp.csr_matrix) -> sp.csr_matrix:
    """A private copy with sorted, unique indices and no stored zeros."""
    relevant = sp.csr_matrix(relevant, copy=True)
    relevant.eliminate_zeros()
    relevant.sum_duplicates()
    return relevant


def _checked_ks(ks: Sequence[int]) -> list[int]:
    ks = [int(k) for k in ks]
    if not ks or min(ks) < 1:
        raise ValueError(f"ks must be a non-empty list of cutoffs >= 1, got {ks}")
    return ks


def _checked_ranked(ranked: np.ndarray, shape: tuple[int, int], ks: list[int]) -> np.ndarray:
    """Validates ``ranked`` and pads it with -1 up to the largest cutoff."""
    ranked = np.asarray(ranked, dtype=np.int64)
    if ranked.ndim != 2 or ranked.shape[0] != shape[0]:
        raise ValueError(f"ranked must be ({shape[0]}, K), got shape {ranked.shape}")
    if ranked.size and (ranked.min() < -1 or ranked.max() >= shape[1]):
        raise ValueError(f"ranked holds item indices outside [-1, {shape[1]})")
    missing = max(ks) - ranked.shape[1]
    if missing > 0:
        ranked = np.pad(ranked, ((0, 0), (0, missing)), constant_values=-1)
    return ranked


def _hits(ranked: np.ndarray, rows: np.ndarray, relevant: sp.csr_matrix) -> np.ndarray:
    """(Qc, K) bool: whether ``ranked[j, i]`` is relevant to row ``rows[j]``.

    Each (row, item) pair becomes the key row * N + item; the relevant keys are sorted
    because the CSR is canonical, so one searchsorted finds every candidate.
    """
    num_items = relevant.shape[1]
    relevant_rows = np.repeat(
        np.arange(relevant.shape[0], dtype=np.int64), np.diff(relevant.indptr)
    )
    keys = relevant_rows * num_items + relevant.indices
    if len(keys) == 0:
        return np.zeros(ranked.shape, dtype=bool)
    candidates = rows[:, None] * num_items + ranked
    found = np.minimum(np.searchsorted(keys, candidates), len(keys) - 1)
    return (ranked >= 0) & (keys[found] == candidates)


def row_metrics(
    hit_rows: np.ndarray, hit_positions: np.ndarray, num_relevant: np.ndarray, ks: list[int]
) -> dict[str, np.ndarray]:
    """Each row's recall, hr, ndcg, mrr and precision at every cutoff, from its hits
    alone (the one routine every metric here, and every group's, goes through).

    Args:
        hit_rows: (H,) the row of each hit, ascending.
        hit_positions: (H,) its 0-based rank, ascending within a row.
        num_relevant: (Q,) each row's relevant items, each >= 1.
        ks: the cutoffs.

    Returns:
        ``{"recall@k": (Q,) ..., "hr@k", "ndcg@k", "mrr@k", "precision@k"}``, k by k.
    """
    Q, K = len(num_relevant), max(ks)
    discount = 1.0 / np.log2(np.arange(2, K + 2))  # (K,) rank i -> 1 / log2(i + 1)
    ideal = np.cumsum(discount)
    first_hit = np.full(Q, K, dtype=np.int64)  # 0-based, K = none
    firsts = np.flatnonzero(np.diff(hit_rows, prepend=-1))  # each row's first hit
    first_hit[hit_rows[firsts]] = hit_positions[firsts]
    result = {}
    for k in ks:
        within = hit_positions < k
        rows, weights = hit_rows[within], discount[hit_positions[within]]
        hits = np.bincount(rows, minlength=Q)  # (Q,) hits@k
        # summed in rank order within a row, as a running sum over ranks would
        dcg = np.bincount(rows, weights=weights, minlength=Q)
        result[f"recall@{k}"] = hits / num_relevant
        result[f"hr@{k}"] = hits > 0
        result[f"ndcg@{k}"] = dcg / ideal[np.minimum(k, num_relevant) - 1]
        result[f"mrr@{k}"] = np.where(first_hit < k, 1.0 / (first_hit + 1), 0.0)
        result[f"precision@{k}"] = hits / k
    return result


def _popularity(ranked: np.ndarray, item_popularity: np.ndarray, ks: list[int]) -> dict:
    """Each row's ``popularity@k``: the mean popularity of its top k (padding left out)."""
    present = ranked >= 0
    popularity = np.cumsum(np.where(present, item_popularity[np.maximum(ranked, 0)], 0.0), axis=1)
    shown = np.cumsum(present, axis=1)
    return {f"popularity@{k}": popularity[:, k - 1] / np.maximum(shown[:, k - 1], 1) for k in ks}
