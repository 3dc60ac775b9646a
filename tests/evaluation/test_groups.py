"""Metrics by group: the cut-off rules on hand-made counts, the vectorized group metrics
against a per-query Python loop, and each query's own metrics against the means."""

import math
from collections import defaultdict

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest
import scipy.sparse as sp
import torch

from twotower.data.splits import Split
from twotower.evaluation.groups import (
    ITEM_GROUPS,
    QUERY_GROUPS,
    activity_cutoffs,
    item_groups,
    query_groups,
)
from twotower.evaluation.metrics import ranking_metrics
from twotower.evaluation.per_query import QueryMetrics, write_query_metrics
from twotower.evaluation.ranking import HeldOut, evaluate, evaluate_chunks


def _names(labels: np.ndarray, groups: tuple[str, ...]) -> list[str]:
    return [groups[i] for i in labels]


def test_item_groups_cut_by_share_of_training_interactions() -> None:
    # 50 interactions: the head holds the first 10 (item 30 alone crosses the line),
    # the tail the last 10 (1 + 1 + 2 + 3 = 7, then 5 crosses it), item 8 is between
    counts = np.array([30, 0, 1, 1, 2, 3, 5, 8])
    names = _names(item_groups(counts), ITEM_GROUPS)
    assert names == ["head", "new", "tail", "tail", "tail", "tail", "tail", "torso"]


def test_item_groups_keep_equal_counts_together_and_the_head_wins_an_overlap() -> None:
    # 130 interactions: the head's line (26) falls inside the 10s, so every 10 joins
    # the head; the tail's (26 from the bottom) inside the 1s; the 5s are between
    counts = np.array([10] * 8 + [5] * 4 + [1] * 30)
    names = _names(item_groups(counts), ITEM_GROUPS)
    assert names == ["head"] * 8 + ["torso"] * 4 + ["tail"] * 30
    # one count everywhere: head and tail lines fall on the same count; head wins
    assert set(_names(item_groups(np.full(6, 3)), ITEM_GROUPS)) == {"head"}
    assert set(_names(item_groups(np.zeros(4)), ITEM_GROUPS)) == {"new"}


def test_item_group_shares_are_configurable() -> None:
    counts = np.array([40, 30, 20, 10])
    names = _names(item_groups(counts, head_share=0.5, tail_share=0.1), ITEM_GROUPS)
    assert names == ["head", "head", "torso", "tail"]


@pytest.mark.parametrize(
    ("counts", "cutoffs", "expected"),
    [
        ([1, 2, 3, 4, 5, 6], (2, 4), ["few"] * 2 + ["some"] * 2 + ["many"] * 2),
        # ties keep a count together: the thirds fall inside the 5s, "some" is empty
        ([5, 5, 5, 5, 9, 20], (5, 5), ["few"] * 4 + ["many"] * 2),
        ([0, 0, 7], (0, 0), ["few", "few", "many"]),
        ([3], (3, 3), ["few"]),
    ],
)
def test_activity_groups_are_terciles_of_the_queries_counts(counts, cutoffs, expected) -> None:
    got = activity_cutoffs(np.bincount(counts))
    assert got == cutoffs
    assert _names(query_groups(np.array(counts), got), QUERY_GROUPS) == expected


def _python_item_groups(counts: np.ndarray) -> list[str]:
    """The rule of the module doc, item by item."""
    total = sum(counts)
    running, head_min = 0.0, None
    for c in sorted((c for c in counts if c > 0), reverse=True):
        running += c
        if running >= 0.2 * total:
            head_min = c
            break
    running, tail_max = 0.0, None
    for c in sorted(c for c in counts if c > 0):
        running += c
        if running >= 0.2 * total:
            tail_max = c
            break
    names = []
    for c in counts:
        if c == 0:
            names.append("new")
        elif c >= head_min:
            names.append("head")
        elif c <= tail_max:
            names.append("tail")
        else:
            names.append("torso")
    return names


def _python_row(top: list[int], relevant: set[int], k: int) -> dict[str, float]:
    """One query's metrics at ``k`` from its ranking and relevant items."""
    hit_ranks = [r for r, i in enumerate(top[:k], start=1) if i >= 0 and i in relevant]
    dcg = sum(1 / math.log2(r + 1) for r in hit_ranks)
    idcg = sum(1 / math.log2(r + 1) for r in range(1, min(k, len(relevant)) + 1))
    return {
        f"recall@{k}": len(hit_ranks) / len(relevant),
        f"hr@{k}": 1.0 if hit_ranks else 0.0,
        f"ndcg@{k}": dcg / idcg,
        f"mrr@{k}": 1 / hit_ranks[0] if hit_ranks else 0.0,
        f"precision@{k}": len(hit_ranks) / k,
    }


def _python_tercile(counts: list[int], fraction: float) -> int:
    n = len(counts)
    return min(c for c in counts if sum(x <= c for x in counts) >= fraction * n)


def _reference_groups(ranked, sets, ks, item_counts, query_counts, popularity):
    """Every ``groups/...`` key, computed query by query with sets."""
    counted = [q for q in range(len(sets)) if sets[q]]
    width = max(ks)  # padded with -1 up to the largest cutoff
    top = {q: [int(i) for i in ranked[q]] + [-1] * max(0, width - ranked.shape[1]) for q in counted}
    result = _reference_item_groups(top, sets, ks, item_counts)
    counts = [int(query_counts[q]) for q in counted]
    few, some = _python_tercile(counts, 1 / 3), _python_tercile(counts, 2 / 3)
    for q in counted:
        count = int(query_counts[q])
        group = "few" if count <= few else "some" if count <= some else "many"
        prefix = f"groups/query:{group}/"
        result[prefix + "queries"] = result.get(prefix + "queries", 0) + 1
        result[prefix + "min_count"] = float(min(result.get(prefix + "min_count", 1e9), count))
        result[prefix + "max_count"] = float(max(result.get(prefix + "max_count", -1), count))
        for k in ks:
            values = _python_row(top[q], sets[q], k)
            shown = [popularity[i] for i in top[q][:k] if i >= 0]
            values[f"popularity@{k}"] = sum(shown) / len(shown) if shown else 0.0
            for name, value in values.items():
                result.setdefault(prefix + "sums/" + name, []).append(value)
    for key in [key for key in result if "/sums/" in key]:
        values = result.pop(key)
        result[key.replace("sums/", "")] = sum(values) / len(values)
    return result


def _reference_item_groups(top, sets, ks, item_counts):
    names = _python_item_groups(item_counts)
    result = {}
    for group in ITEM_GROUPS:
        members = {i for i, n in enumerate(names) if n == group}
        if not members:
            continue
        prefix = f"groups/item:{group}/"
        rows = [q for q in top if sets[q] & members]
        result[prefix + "items"] = len(members)
        result[prefix + "min_count"] = float(min(item_counts[i] for i in members))
        result[prefix + "max_count"] = float(max(item_counts[i] for i in members))
        result[prefix + "queries"] = len(rows)
        for k in ks:
            values = defaultdict(list)
            for q in rows:
                for name, value in _python_row(top[q], sets[q] & members, k).items():
                    values[name].append(value)
            result.update({prefix + name: sum(v) / len(v) for name, v in values.items()})
            shares = []
            for q in top:
                shown = [i for i in top[q][:k] if i >= 0]
                shares.append(sum(i in members for i in shown) / len(shown) if shown else 0.0)
            result[prefix + f"share@{k}"] = sum(shares) / len(shares)
            covered = {i for q in top for i in top[q][:k] if i in members}
            result[prefix + f"coverage@{k}"] = len(covered) / len(members)
    return result


def _random_case(seed: int):
    rng = np.random.default_rng(seed)
    num_rows, num_items, width = 50, 30, 8
    ranked = np.full((num_rows, width), -1, dtype=np.int64)
    for q in range(num_rows):
        shown = rng.integers(0, width + 1)  # 0..width real items, the rest padding
        ranked[q, :shown] = rng.permutation(num_items)[:shown]
    sets = [set(np.flatnonzero(rng.random(num_items) < 0.2).tolist()) for _ in range(num_rows)]
    for q in rng.choice(num_rows, size=6, replace=False):
        sets[q] = set()  # rows that must not be counted
    item_counts = np.floor(rng.pareto(1.2, num_items) * 5)  # skewed; some items new
    query_counts = rng.integers(0, 12, num_rows)  # few distinct values: ties at the cuts
    return ranked, sets, item_counts, query_counts


def _relevant(sets: list[set[int]], num_items: int) -> sp.csr_matrix:
    dense = np.zeros((len(sets), num_items), dtype=np.float32)
    for row, items in enumerate(sets):
        dense[row, sorted(items)] = 1.0
    return sp.csr_matrix(dense)


@pytest.mark.parametrize("seed", range(8))
def test_group_metrics_equal_the_per_query_python_reference(seed: int) -> None:
    ranked, sets, item_counts, query_counts = _random_case(seed)
    ks = [1, 3, 5, 8, 12]
    relevant = _relevant(sets, len(item_counts))
    metrics = ranking_metrics(
        ranked, relevant, ks, item_counts, item_counts=item_counts, query_counts=query_counts
    )
    got = {key: value for key, value in metrics.items() if key.startswith("groups/")}
    expected = _reference_groups(ranked, sets, ks, item_counts, query_counts, item_counts)
    assert set(got) == set(expected)
    for name, value in expected.items():
        assert got[name] == pytest.approx(value, abs=1e-12), name
    ungrouped = ranking_metrics(ranked, relevant, ks, item_counts)
    assert {k: v for k, v in metrics.items() if not k.startswith("groups/")} == ungrouped


def test_a_group_of_items_is_reported_only_with_its_items() -> None:
    # no item is new, so there is no "new" group; item 2's group holds no held-out item
    counts = np.array([10.0, 10.0, 1.0])
    ranked = np.array([[0, 1, 2]])
    metrics = ranking_metrics(ranked, _relevant([{0}], 3), [2], None, counts, np.array([4]))
    assert not any("item:new" in key for key in metrics)
    assert metrics["groups/item:tail/queries"] == 0
    assert "groups/item:tail/recall@2" not in metrics
    assert metrics["groups/item:tail/coverage@2"] == 0.0  # item 2 is ranked third
    assert metrics["groups/item:head/share@2"] == 1.0


def test_groups_need_the_queries_counts() -> None:
    with pytest.raises(ValueError, match="query_counts"):
        ranking_metrics(np.array([[0]]), _relevant([{0}], 2), [1], None, np.ones(2))


def _lookup(scores: np.ndarray):
    table = torch.from_numpy(scores.astype(np.float32))
    return lambda rows: table[torch.from_numpy(rows)]


def _split_case(seed: int = 0):
    """20 queries, 15 items: random train, valid and test interactions and scores."""
    rng = np.random.default_rng(seed)
    parts = {}
    for name, p in (("train", 0.3), ("valid", 0.1), ("test", 0.15)):
        queries, items = np.nonzero(rng.random((20, 15)) < p)
        parts[name] = pa.table({"query_idx": queries, "item_idx": items})
    return Split(**parts), rng.random((20, 15))


@pytest.mark.parametrize("part", ["valid", "test"])
def test_each_querys_metrics_average_to_the_parts_and_groups_chunk_by_chunk(
    part: str, tmp_path
) -> None:
    from twotower.data.matrix import interaction_matrix, known_before

    split, scores = _split_case()
    ks = (1, 5, 10)
    whole = evaluate(_lookup(scores), split, part, 20, 15, ks, groups=True)
    held_out = interaction_matrix(split.part(part), 20, 15)
    seen = known_before(split, part, 20, 15)
    ids = np.array([f"user-{q}" for q in range(20)])
    chunks = [
        HeldOut(_lookup(scores[rows]), held_out[rows], seen[rows], pa.array(ids[rows]))
        for rows in (slice(0, 7), slice(7, 8), slice(8, 20))
    ]
    per_query = QueryMetrics()
    counts = np.asarray(seen.sum(axis=0)).ravel()
    got = evaluate_chunks(chunks, part, 15, ks, item_counts=counts, per_query=per_query)
    assert got.keys() == whole.keys()
    for name, value in whole.items():
        assert got[name] == pytest.approx(value, rel=1e-12), name
    table = per_query.table()
    assert table.num_rows == got[f"{part}/queries"]
    assert set(table.column("part").to_pylist()) == {part}
    for path in (tmp_path / "q.parquet", tmp_path / "q.csv"):
        write_query_metrics(table, path)
        read = pq.read_table(path) if path.suffix == ".parquet" else pacsv.read_csv(path)
        assert read.to_pylist() == table.to_pylist()  # floats written exactly
        _check_means(read, got, part, seen, ids)


def _check_means(table: pa.Table, metrics: dict, part: str, seen, ids) -> None:
    """Every metric column's mean is the part's metric, its mean over a group's rows the
    group's; each row's count is its seen items."""
    rows = table.to_pylist()
    for name in ("recall@5", "ndcg@10", "hr@1", "mrr@10", "precision@5"):
        mean = sum(r[name] for r in rows) / len(rows)
        assert mean == pytest.approx(metrics[f"{part}/{name}"], rel=1e-12)
        for group in QUERY_GROUPS:
            inside = [r[name] for r in rows if r["group"] == group]
            key = f"{part}/groups/query:{group}/{name}"
            assert (key in metrics) == bool(inside)
            if inside:
                assert sum(inside) / len(inside) == pytest.approx(metrics[key], rel=1e-12)
    by_id = {str(i): int(n) for i, n in zip(ids, np.diff(seen.indptr), strict=True)}
    assert all(r["train_count"] == by_id[r["query_id"]] for r in rows)


def test_without_ids_the_rows_are_numbered_across_chunks() -> None:
    split, scores = _split_case(1)
    from twotower.data.matrix import interaction_matrix, known_before

    held_out = interaction_matrix(split.test, 20, 15)
    seen = known_before(split, "test", 20, 15)
    chunks = [
        HeldOut(_lookup(scores[rows]), held_out[rows], seen[rows])
        for rows in (slice(0, 9), slice(9, 20))
    ]
    per_query = QueryMetrics()
    evaluate_chunks(chunks, "test", 15, (5,), per_query=per_query)
    expected = np.flatnonzero(np.diff((held_out - held_out.multiply(seen)).tocsr().indptr) > 0)
    assert per_query.table().column("query_id").to_pylist() == expected.tolist()


def test_a_part_with_no_evaluated_query_adds_no_rows() -> None:
    seen = sp.csr_matrix(np.ones((3, 4), dtype=np.float32))
    chunk = HeldOut(_lookup(np.zeros((3, 4))), seen.copy(), seen)  # every item seen
    per_query = QueryMetrics()
    counts = np.full(4, 3.0)
    got = evaluate_chunks([chunk], "test", 4, (2,), item_counts=counts, per_query=per_query)
    assert got["test/queries"] == 0 and per_query.table().num_rows == 0
    assert not any(key.startswith("test/groups/query:") for key in got)
