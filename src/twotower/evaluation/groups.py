"""Ranking metrics by group: items by popularity, queries by activity.

Both groupings read training counts, the interactions known before the evaluated part
(train for ``valid``; train + valid for ``test``), so nothing of the part itself decides
a group.

Item popularity (an item's count: how many queries knew it). The items are cut by
their share of the training interactions, not by their number, because counts are so
skewed that "the top 20% of items" holds most interactions and a tail cut by number
holds almost no held-out item. Sorted by count:

    head   the most popular items that together hold the first ``head_share`` (20%)
           of the training interactions (the item that crosses the line included)
    tail   the least popular items, count >= 1, that together hold the last
           ``tail_share`` (20%) of them (the crossing item included)
    torso  the items in between (about 60% of the interactions)
    new    the items with no training interaction at all

Items with equal counts always share a group: a cut is a count (``head``: count >=
the crossing item's; ``tail``: count <= its crossing item's; ``head`` wins an overlap).
Head and tail hold about as many held-out pairs as each other when the evaluated part
follows training popularity, so their metrics rest on similar evidence.

Query activity (a query's count: the items it knew). Terciles of the evaluated
queries' counts, so that each dataset gets three groups of about a third of its
queries each (fixed cut-offs would put every MovieLens user, 20 ratings or more, in
one group):

    few    count <= the lower tercile (the smallest count c with at least a third of
           the evaluated queries at or below c)
    some   lower tercile < count <= the upper tercile (two thirds)
    many   count > the upper tercile

Ties keep a count in one group, so the groups are only about equal. The actual
cut-offs are reported as each group's ``min_count`` and ``max_count``.

A query's metrics within an item group count only its held-out items of that group,
against its full ranking: its recall is the share of those items in the top k, its
hr whether one is there, its ndcg and mrr rank those items alone, and a query with none
of them is not counted in that group. Query groups average the usual per-query metrics
over their queries. Beside them, per item group: ``share@k``, the mean share of a
query's top k taken by the group's items (padding excluded; popularity bias), and
``coverage@k``, the share of the group's items in some counted query's top k.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import scipy.sparse as sp

ITEM_GROUPS = ("head", "torso", "tail", "new")
QUERY_GROUPS = ("few", "some", "many")
METRICS = ("recall", "hr", "ndcg", "mrr", "precision")

# (hit rows, hit ranks, num_relevant) -> each row's value of every metric at every cutoff
PerRow = Callable[[np.ndarray, np.ndarray, np.ndarray], dict[str, np.ndarray]]


def item_groups(counts: np.ndarray, head_share: float = 0.2, tail_share: float = 0.2) -> np.ndarray:
    """(N,) each item's group, an index into ``ITEM_GROUPS`` (rule in the module doc).

    Args:
        counts: (N,) training interactions per item, >= 0.
        head_share: the share of training interactions the head holds.
        tail_share: the share the tail holds.
    """
    counts = np.asarray(counts, dtype=np.float64)
    labels = np.full(len(counts), ITEM_GROUPS.index("new"), dtype=np.int8)
    known = np.sort(counts[counts > 0])  # ascending
    if len(known) == 0:
        return labels
    total = known.sum()
    descending = known[::-1]
    head_min = descending[_crossing(np.cumsum(descending), head_share * total)]
    tail_max = known[_crossing(np.cumsum(known), tail_share * total)]
    labels[counts > 0] = ITEM_GROUPS.index("torso")
    labels[(counts > 0) & (counts <= tail_max)] = ITEM_GROUPS.index("tail")
    labels[counts >= head_min] = ITEM_GROUPS.index("head")
    return labels


def _crossing(cumulative: np.ndarray, line: float) -> int:
    """The first position whose running sum reaches ``line`` (the last if none does)."""
    return min(int(np.searchsorted(cumulative, line, side="left")), len(cumulative) - 1)


def activity_cutoffs(queries_per_count: np.ndarray) -> tuple[int, int]:
    """The lower and upper terciles of the queries' training counts (the largest count
    of ``few`` and of ``some``).

    Args:
        queries_per_count: (C,) how many evaluated queries have each count 0..C-1;
            at least one query.
    """
    cumulative = 3 * np.cumsum(queries_per_count)  # x3: the thirds in whole numbers
    total = cumulative[-1] // 3
    return int(np.searchsorted(cumulative, total)), int(np.searchsorted(cumulative, 2 * total))


def query_groups(counts: np.ndarray, cutoffs: tuple[int, int]) -> np.ndarray:
    """(Q,) each query's group, an index into ``QUERY_GROUPS``, from ``activity_cutoffs``."""
    counts = np.asarray(counts)
    return ((counts > cutoffs[0]).astype(np.int8) + (counts > cutoffs[1])).astype(np.int8)


class GroupTotals:
    """Sums of per-query metrics by item group and by query training count, chunk by
    chunk, for ``RankingTotals`` (which owns the ranking and the per-row metrics).

    Args:
        ks: the cutoffs.
        item_counts: (N,) training interactions per item; they set the item groups.
        per_row: each row's metrics from its hits' rows and ranks and its held-out
            count (``twotower.evaluation.metrics.row_metrics``).
    """

    def __init__(self, ks: list[int], item_counts: np.ndarray, per_row: PerRow) -> None:
        self.ks, self.per_row = ks, per_row
        self.item_counts = np.asarray(item_counts, dtype=np.float64)
        self.labels = item_groups(self.item_counts)
        shape = (len(ITEM_GROUPS),)
        self.item_rows = np.zeros(shape, dtype=np.int64)
        self.item_sums = {f"{m}@{k}": np.zeros(shape) for m in METRICS for k in ks}
        self.shares = {k: np.zeros(shape) for k in ks}
        self.rows = 0
        self.queries_per_count = np.zeros(0, dtype=np.int64)
        self.count_sums: dict[str, np.ndarray] = {}

    def add(
        self,
        ranked: np.ndarray,
        hits: tuple[np.ndarray, np.ndarray],
        relevant: sp.csr_matrix,
        query_counts: np.ndarray,
        values: dict[str, np.ndarray],
    ) -> None:
        """Counts the rows of a chunk: their (Qc, K) ``ranked`` items, the (row, rank)
        of each of their ``hits`` (``np.nonzero`` order), their (Qc, N) canonical
        ``relevant`` CSR, (Qc,) training counts, and each row's ``values`` of every
        metric (the rows' own, from ``per_row``)."""
        ranked_groups = np.where(ranked >= 0, self.labels[np.maximum(ranked, 0)], -1)  # (Qc, K)
        self._add_item_groups(hits, relevant, ranked_groups[hits])
        self._add_shares(ranked_groups)
        self._add_by_count(np.asarray(query_counts, dtype=np.int64), values)
        self.rows += len(ranked)

    def _add_item_groups(
        self, hits: tuple[np.ndarray, np.ndarray], relevant: sp.csr_matrix, hit_groups: np.ndarray
    ) -> None:
        """Each item group's metrics: hits and held-out items outside it ignored."""
        G = len(ITEM_GROUPS)
        owner = np.repeat(np.arange(relevant.shape[0]), np.diff(relevant.indptr))
        keys = owner * G + self.labels[relevant.indices]
        held_out = np.bincount(keys, minlength=relevant.shape[0] * G).reshape(-1, G)  # (Qc, G)
        for group in range(G):
            counted = held_out[:, group] > 0
            if not counted.any():
                continue
            renumbered = np.cumsum(counted) - 1  # a counted row's place among them
            mine = hit_groups == group  # a group's hits lie in its counted rows
            rows, positions = renumbered[hits[0][mine]], hits[1][mine]
            values = self.per_row(rows, positions, held_out[counted, group])
            for name, sums in self.item_sums.items():
                sums[group] += float(np.sum(values[name]))
            self.item_rows[group] += int(counted.sum())

    def _add_shares(self, groups: np.ndarray) -> None:
        """The share of each row's top k that each item group takes: a row's top k items
        weigh 1 / (its items shown) each."""
        present = groups >= 0
        for k in self.ks:  # ranked is padded to the largest k
            shown = present[:, :k].sum(axis=1)
            weights = np.broadcast_to(1.0 / np.maximum(shown, 1)[:, None], (len(groups), k))
            top = present[:, :k]
            shares = np.bincount(groups[:, :k][top], weights[top], minlength=len(ITEM_GROUPS))
            self.shares[k] += shares

    def _add_by_count(self, counts: np.ndarray, values: dict[str, np.ndarray]) -> None:
        """Per-row metrics summed by training count; the query groups are cut at the end,
        when every count is known."""
        size = max(len(self.queries_per_count), int(counts.max(initial=-1)) + 1)
        self.queries_per_count = _grown(self.queries_per_count, size)
        self.queries_per_count += np.bincount(counts, minlength=size)
        for name, row_values in values.items():
            sums = _grown(self.count_sums.get(name, np.zeros(0)), size)
            self.count_sums[name] = sums + np.bincount(counts, row_values, minlength=size)

    def cutoffs(self) -> tuple[int, int] | None:
        """The activity groups' cut-offs (``activity_cutoffs``); None before any row."""
        return activity_cutoffs(self.queries_per_count) if self.rows else None

    def result(self, best_position: np.ndarray) -> dict[str, float]:
        """``groups/item:{group}/...`` and ``groups/query:{group}/...`` (module doc);
        ``best_position``: (N,) each item's best 0-based position in any counted row."""
        return {**self._item_result(best_position), **self._query_result()}

    def _item_result(self, best_position: np.ndarray) -> dict[str, float]:
        result: dict[str, float] = {}
        for group, name in enumerate(ITEM_GROUPS):
            members = self.labels == group
            if not members.any():
                continue
            prefix, rows = f"groups/item:{name}/", int(self.item_rows[group])
            counts = self.item_counts[members]
            result[prefix + "items"] = int(members.sum())
            result[prefix + "min_count"] = float(counts.min())
            result[prefix + "max_count"] = float(counts.max())
            result[prefix + "queries"] = rows
            for metric, sums in self.item_sums.items():
                if rows:
                    result[prefix + metric] = float(sums[group]) / rows
            for k in self.ks:
                share = self.shares[k][group] / self.rows if self.rows else float("nan")
                result[prefix + f"share@{k}"] = share
                covered = np.count_nonzero(best_position[members] < k)
                result[prefix + f"coverage@{k}"] = covered / int(members.sum())
        return result

    def _query_result(self) -> dict[str, float]:
        cutoffs = self.cutoffs()
        if cutoffs is None:
            return {}
        counts = np.arange(len(self.queries_per_count))
        groups = query_groups(counts, cutoffs)
        result: dict[str, float] = {}
        for group, name in enumerate(QUERY_GROUPS):
            members = (groups == group) & (self.queries_per_count > 0)
            rows = int(self.queries_per_count[members].sum())
            if rows == 0:
                continue
            prefix = f"groups/query:{name}/"
            result[prefix + "queries"] = rows
            result[prefix + "min_count"] = float(counts[members].min())
            result[prefix + "max_count"] = float(counts[members].max())
            for metric, sums in self.count_sums.items():
                result[prefix + metric] = float(sums[members].sum()) / rows
        return result


def _grown(values: np.ndarray, size: int) -> np.ndarray:
    """``values`` padded with zeros to ``size``."""
    return np.pad(values, (0, size - len(values))) if len(values) < size else values
