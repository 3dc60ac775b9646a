"""Exact top-k against a full stable sort in Python: ties, exclusions, chunking."""

import math

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from twotower.index.topk import top_k


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


def test_chunks_hold_at_most_max_chunk_scores_when_n_is_known(monkeypatch) -> None:
    import twotower.index.topk as topk

    monkeypatch.setattr(topk, "MAX_CHUNK_SCORES", 100)
    scores = np.random.default_rng(0).normal(size=(30, 40)).astype(np.float32)
    sizes = []

    def score_fn(rows: np.ndarray) -> torch.Tensor:
        sizes.append(len(rows))
        return torch.from_numpy(scores[rows])

    ids, _ = top_k(score_fn, np.arange(30), k=5, chunk_size=16, num_items=40)
    assert max(sizes) == 2 and sum(sizes) == 30  # 100 // 40 queries a chunk
    np.testing.assert_array_equal(ids, np.argsort(-scores, axis=1, kind="stable")[:, :5])
