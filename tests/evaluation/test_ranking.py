import math

import numpy as np
import pyarrow as pa
import pytest
import scipy.sparse as sp
import torch

from twotower.data.splits import Split
from twotower.evaluation.metrics import ranking_metrics
from twotower.evaluation.ranking import evaluate, top_k


def _lookup(scores: np.ndarray):
    """A score_fn reading rows of a fixed (num_queries, N) score matrix."""
    table = torch.from_numpy(scores.astype(np.float32))

    def score_fn(chunk: np.ndarray) -> torch.Tensor:
        return table[torch.from_numpy(chunk)]

    return score_fn


def _brute_force(scores: np.ndarray, query_idx, k: int, exclude=None):
    """Full stable sort of every row: best score first, lower index first among ties."""
    ids = np.full((len(query_idx), k), -1, dtype=np.int64)
    top = np.full((len(query_idx), k), -np.inf, dtype=np.float32)
    for row, q in enumerate(query_idx):
        banned = set() if exclude is None else set(exclude[q].indices.tolist())
        pairs = [(-s, i) for i, s in enumerate(scores[q]) if i not in banned and s > -np.inf]
        best = sorted(pairs)[:k]
        ids[row, : len(best)] = [i for _, i in best]
        top[row, : len(best)] = [-s for s, _ in best]
    return ids, top


def _random_exclude(rng: np.random.Generator, shape: tuple[int, int]) -> sp.csr_matrix:
    dense = rng.random(shape) < 0.5
    dense[3] = True  # a query with no item left: all padding
    return sp.csr_matrix(dense.astype(np.float32))


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("with_exclude", [False, True])
def test_top_k_equals_brute_force_for_every_chunk_size(seed: int, with_exclude: bool) -> None:
    rng = np.random.default_rng(seed)
    num_queries, num_items, k = 20, 30, 8
    # Few distinct values, so that ties are everywhere, including at the k-th place.
    scores = rng.integers(0, 4, size=(num_queries, num_items)).astype(np.float32)
    exclude = _random_exclude(rng, scores.shape) if with_exclude else None
    # Queries in any order, one repeated, and query 3 (everything excluded) included.
    query_idx = np.r_[rng.permutation(num_queries)[:14], 3, 3]
    expected = _brute_force(scores, query_idx, k, exclude)
    for chunk_size in (1, 3, 7, 15, 100):
        ids, top = top_k(_lookup(scores), query_idx, k, exclude=exclude, chunk_size=chunk_size)
        assert ids.dtype == np.int64 and top.dtype == np.float32
        np.testing.assert_array_equal(ids, expected[0])
        np.testing.assert_array_equal(top, expected[1])


def test_all_ties_go_to_the_lowest_indices() -> None:
    # Many items with one score: torch.topk alone may return any of them.
    scores = np.zeros((4, 5000), dtype=np.float32)
    ids, top = top_k(_lookup(scores), np.arange(4), k=10, chunk_size=3)
    np.testing.assert_array_equal(ids, np.tile(np.arange(10), (4, 1)))
    assert (top == 0).all()


def test_large_k_with_ties_matches_a_stable_sort() -> None:
    # With thousands of kept items an unstable sort would scramble the tied ones.
    scores = np.random.default_rng(0).integers(0, 3, size=(3, 3000)).astype(np.float32)
    ids, top = top_k(_lookup(scores), np.arange(3), k=3000)
    expected = np.argsort(-scores, axis=1, kind="stable")
    np.testing.assert_array_equal(ids, expected)
    np.testing.assert_array_equal(top, np.take_along_axis(scores, expected, axis=1))


def test_ties_at_the_boundary_go_to_the_lowest_indices() -> None:
    # Row 0: item 5 is best, then items 0..4 and 6..4999 tie; k = 3 -> 5, 0, 1.
    # Row 1: items 4999 and 7 tie for best -> 7, 4999, then the tie at 0 -> item 0.
    scores = np.zeros((2, 5000), dtype=np.float32)
    scores[0, 5] = 2.0
    scores[1, [7, 4999]] = 1.0
    ids, _ = top_k(_lookup(scores), np.arange(2), k=3)
    np.testing.assert_array_equal(ids, [[5, 0, 1], [7, 4999, 0]])


def test_ties_inside_the_top_k_are_in_index_order() -> None:
    # Items 9 and 2 tie for best, well above the cut: the fast path orders them by index.
    scores = np.zeros((1, 50), dtype=np.float32)
    scores[0, [9, 2, 4]] = [5.0, 5.0, 3.0]
    ids, top = top_k(_lookup(scores), np.array([0]), k=3)
    np.testing.assert_array_equal(ids, [[2, 9, 4]])
    np.testing.assert_array_equal(top, [[5.0, 5.0, 3.0]])


@pytest.mark.parametrize("k", [1, 10, 100, 2000])
def test_rows_with_and_without_crossing_ties_match_a_stable_sort(k: int) -> None:
    # Values on a coarse grid: some rows tie across the k-th place, some only inside.
    rng = np.random.default_rng(k)
    scores = np.round(rng.normal(size=(64, 2000)), 2).astype(np.float32)
    scores[::5] = np.round(scores[::5], 0)  # every fifth row: heavy ties
    ids, top = top_k(_lookup(scores), np.arange(64), k=k, chunk_size=16)
    expected = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    np.testing.assert_array_equal(ids, expected)
    np.testing.assert_array_equal(top, np.take_along_axis(scores, expected, axis=1))


def test_excluded_items_are_skipped_and_rows_padded() -> None:
    scores = np.array([[1.0, 3.0, 2.0]], dtype=np.float32)
    exclude = sp.csr_matrix(np.array([[0.0, 1.0, 0.0]], dtype=np.float32))
    ids, top = top_k(_lookup(scores), np.array([0]), k=5, exclude=exclude)
    np.testing.assert_array_equal(ids, [[2, 0, -1, -1, -1]])
    np.testing.assert_array_equal(top, [[2.0, 1.0, -np.inf, -np.inf, -np.inf]])


def test_memory_is_bounded_by_chunk_and_scores_are_not_modified() -> None:
    scores = np.arange(30, dtype=np.float32).reshape(10, 3)
    table = torch.from_numpy(scores.copy())
    calls: list[int] = []

    def score_fn(chunk: np.ndarray) -> torch.Tensor:
        calls.append(len(chunk))
        return table[torch.from_numpy(chunk)] if len(chunk) < 10 else table

    exclude = sp.csr_matrix(np.ones((10, 3), dtype=np.float32))
    top_k(score_fn, np.arange(10), k=2, exclude=exclude, chunk_size=4)
    assert calls == [4, 4, 2]
    top_k(score_fn, np.arange(10), k=2, exclude=exclude, chunk_size=10)
    np.testing.assert_array_equal(table.numpy(), scores)  # masking worked on a copy


def test_no_queries_gives_empty_results() -> None:
    ids, top = top_k(_lookup(np.zeros((2, 3))), np.array([], dtype=np.int64), k=4)
    assert ids.shape == (0, 4) and top.shape == (0, 4)


@pytest.mark.parametrize(
    ("scores", "match"),
    [(torch.zeros(2, 3), "must return"), (torch.full((1, 3), math.nan), "NaN")],
)
def test_bad_scores_are_rejected(scores: torch.Tensor, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        top_k(lambda chunk: scores, np.array([0]), k=2)


# A hand-built split: 4 queries, 6 items.
#   train: q0 {0, 1}, q1 {2}, q2 {0}
#   valid: q0 {2}, q1 {3}, q2 {0} (a re-consumed train item)
#   test:  q0 {1 (seen in train), 3}, q1 {3 (seen in valid)}, q2 {5}, q3 {4}
def _table(pairs: list[tuple[int, int]]) -> pa.Table:
    queries, items = zip(*pairs, strict=True)
    return pa.table({"query_idx": list(queries), "item_idx": list(items)})


SPLIT = Split(
    train=_table([(0, 0), (0, 1), (1, 2), (2, 0)]),
    valid=_table([(0, 2), (1, 3), (2, 0)]),
    test=_table([(0, 1), (0, 3), (1, 3), (2, 5), (3, 4)]),
)
HAND_SCORES = np.array(
    [
        [5.0, 4.0, 3.0, 2.0, 1.0, 0.0],
        [0.0, 1.0, 9.0, 3.0, 3.0, 2.0],
        [1.0, 1.0, 1.0, 1.0, 1.0, 1.0],
        [0.0, 0.0, 0.0, 0.0, 5.0, 0.0],
    ]
)


def _python_evaluation(part: str, exclude_seen: bool, k: int):
    """Per query, with sets: the ranking, the held-out items and recall / hr / mrr."""
    before = ["train"] if part == "valid" else ["train", "valid"]
    seen = [set() for _ in range(4)]
    held = [set() for _ in range(4)]
    for name in before:
        for q, i in zip(*SPLIT.part(name).to_pydict().values(), strict=True):
            seen[q].add(i)
    for q, i in zip(*SPLIT.part(part).to_pydict().values(), strict=True):
        held[q].add(i)
    ranked, relevant, recall, hr, mrr = [], [], [], [], []
    for q in range(4):
        targets = held[q] - seen[q] if exclude_seen else held[q]
        if not targets:
            continue
        pool = [i for i in range(6) if not (exclude_seen and i in seen[q])]
        order = sorted(pool, key=lambda i: (-HAND_SCORES[q, i], i))[:k]
        ranked.append(order + [-1] * (k - len(order)))
        relevant.append(targets)
        hit_ranks = [r for r, i in enumerate(order, start=1) if i in targets]
        recall.append(len(hit_ranks) / len(targets))
        hr.append(float(bool(hit_ranks)))
        mrr.append(1 / hit_ranks[0] if hit_ranks else 0.0)
    return np.array(ranked), relevant, {"recall": recall, "hr": hr, "mrr": mrr}


@pytest.mark.parametrize("part", ["valid", "test"])
@pytest.mark.parametrize("exclude_seen", [True, False])
def test_evaluate_matches_a_python_reference(part: str, exclude_seen: bool) -> None:
    k = 3
    result = evaluate(
        _lookup(HAND_SCORES), SPLIT, part, 4, 6, ks=[k], exclude_seen=exclude_seen, chunk_size=2
    )
    ranked, relevant, simple = _python_evaluation(part, exclude_seen, k)
    assert result[f"{part}/queries"] == len(ranked)
    for name, values in simple.items():
        assert result[f"{part}/{name}@{k}"] == pytest.approx(np.mean(values)), name
    dense = np.zeros((len(relevant), 6), dtype=np.float32)
    for row, items in enumerate(relevant):
        dense[row, sorted(items)] = 1.0
    expected = ranking_metrics(ranked, sp.csr_matrix(dense), [k])
    assert result == {f"{part}/queries": len(ranked)} | {
        f"{part}/{n}": pytest.approx(v) for n, v in expected.items()
    }


def test_evaluate_by_hand_on_test_with_seen_excluded() -> None:
    # Held-out after removing seen items: q0 {3}, q1 {} (dropped), q2 {5}, q3 {4}.
    # Rankings without seen items: q0 [3, 4, 5] (0, 1, 2 seen) -> hit at rank 1;
    # q2 [1, 2, 3] (all tied, lower index first; 0 seen) -> miss; q3 [4, 0, 1] -> rank 1.
    result = evaluate(_lookup(HAND_SCORES), SPLIT, "test", 4, 6, ks=[3])
    assert result["test/queries"] == 3
    assert result["test/recall@3"] == pytest.approx(2 / 3)
    assert result["test/mrr@3"] == pytest.approx(2 / 3)
    assert result["test/ndcg@3"] == pytest.approx(2 / 3)  # (1 + 0 + 1) / 3
    assert result["test/coverage@3"] == pytest.approx(1.0)  # {3, 4, 5, 1, 2, 0}


def test_evaluate_is_independent_of_chunk_size_and_adds_popularity() -> None:
    popularity = np.arange(6, dtype=np.float64)
    results = [
        evaluate(
            _lookup(HAND_SCORES),
            SPLIT,
            "test",
            4,
            6,
            ks=(1, 2),
            chunk_size=c,
            item_popularity=popularity,
        )
        for c in (1, 3, 64)
    ]
    assert results[0] == results[1] == results[2]
    assert "test/popularity@2" in results[0]


def test_evaluate_rejects_an_unknown_part() -> None:
    with pytest.raises(ValueError, match="part"):
        evaluate(_lookup(HAND_SCORES), SPLIT, "train", 4, 6)


@pytest.mark.parametrize("part", ["valid", "test"])
def test_known_popularity_counts_what_was_known_before_the_part(part: str) -> None:
    # queries knowing each item (binary): train q0 {0, 1}, q1 {2}, q2 {0};
    # the test step adds valid q0 {2}, q1 {3}, q2 {0} (already known)
    counts = [2, 1, 1, 0, 0, 0] if part == "valid" else [2, 1, 2, 1, 0, 0]
    given = evaluate(
        _lookup(HAND_SCORES),
        SPLIT,
        part,
        4,
        6,
        ks=[2],
        item_popularity=np.array(counts, np.float32),
    )
    known = evaluate(_lookup(HAND_SCORES), SPLIT, part, 4, 6, ks=[2], item_popularity="known")
    assert known == given and f"{part}/popularity@2" in known


def test_chunks_hold_at_most_max_chunk_scores_when_n_is_known(monkeypatch) -> None:
    import twotower.evaluation.ranking as ranking

    monkeypatch.setattr(ranking, "MAX_CHUNK_SCORES", 100)
    scores = np.random.default_rng(0).normal(size=(30, 40)).astype(np.float32)
    sizes = []

    def score_fn(rows: np.ndarray) -> torch.Tensor:
        sizes.append(len(rows))
        return torch.from_numpy(scores[rows])

    ids, _ = top_k(score_fn, np.arange(30), k=5, chunk_size=16, num_items=40)
    assert max(sizes) == 2 and sum(sizes) == 30  # 100 // 40 queries a chunk
    np.testing.assert_array_equal(ids, np.argsort(-scores, axis=1, kind="stable")[:, :5])
