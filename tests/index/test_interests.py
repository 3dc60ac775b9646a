"""Multi-interest search: K vectors per query, merged by best score, for every index kind."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import scipy.sparse as sp

from twotower.index import INDEXES, ExactIndex, build_index

NO_FAISS = importlib.util.find_spec("faiss") is None


def kinds(exact_only: bool = False) -> list:
    """Index kinds as test parameters, the FAISS ones skipped where faiss is missing."""
    return [
        pytest.param(
            kind,
            marks=pytest.mark.skipif(
                NO_FAISS and kind != "exact",
                reason="FAISS indexes need faiss-cpu (the serve extra)",
            ),
        )
        for kind in sorted(INDEXES)
        if INDEXES[kind]().is_exact or not exact_only  # no FAISS needed to ask
    ]


B, K, D, N, k = 20, 3, 16, 500, 10


def unit(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    vectors = rng.standard_normal(shape)
    return (vectors / np.linalg.norm(vectors, axis=-1, keepdims=True)).astype(np.float32)


@pytest.fixture(scope="module")
def corpus() -> tuple[np.ndarray, np.ndarray, sp.csr_matrix]:
    """500 unit item vectors, 20 queries of 3 unit interests, about 30% excluded per query."""
    rng = np.random.default_rng(0)
    exclude = rng.random((B, N)) < 0.3
    exclude[1] = True  # a query with every item excluded: all padding
    return unit(rng, (N, D)), unit(rng, (B, K, D)), sp.csr_matrix(exclude.astype(np.float32))


def true_top_k(vectors, queries, k, exclude):
    """The top k of every item's best score over the interests, by a full sort in numpy."""
    per_interest = np.einsum("bkd,nd->bkn", queries.astype(np.float64), vectors.astype(np.float64))
    best = per_interest.max(axis=1)  # (B, N)
    interest = per_interest.argmax(axis=1)  # the first (lowest) interest on a tie
    best[exclude.toarray() > 0] = -np.inf
    rows = np.broadcast_to(np.arange(best.shape[1]), best.shape)
    order = np.lexsort((rows, -best), axis=-1)[:, :k]
    top = np.take_along_axis(best, order, axis=1)
    found = top > -np.inf
    return (
        np.where(found, order, -1),
        top,
        np.where(found, np.take_along_axis(interest, order, axis=1), -1),
    )


def merged_searches(index, queries, k, exclude):
    """Each interest searched on its own, merged row by row with a dict of best scores."""
    answers = [index.search(queries[:, j], k, exclude) for j in range(queries.shape[1])]
    ids = np.full((len(queries), k), -1, dtype=np.int64)
    scores = np.full((len(queries), k), -np.inf, dtype=np.float32)
    interests = np.full((len(queries), k), -1, dtype=np.int64)
    for row in range(len(queries)):
        best: dict[int, tuple[float, int]] = {}
        for j, (found, found_scores) in enumerate(answers):
            for item, score in zip(found[row], found_scores[row], strict=True):
                if item >= 0 and (item not in best or score > best[item][0]):
                    best[item] = (score, j)  # strictly better: the lower interest keeps a tie
        kept = sorted(best.items(), key=lambda pair: (-pair[1][0], pair[0]))[:k]
        ids[row, : len(kept)] = [item for item, _ in kept]
        scores[row, : len(kept)] = [score for _, (score, _) in kept]
        interests[row, : len(kept)] = [j for _, (_, j) in kept]
    return ids, scores, interests


@pytest.mark.parametrize("kind", kinds())
def test_equals_the_merge_of_single_vector_searches(corpus, kind: str) -> None:
    vectors, queries, exclude = corpus
    index = build_index(kind, vectors)
    ids, scores, interests = index.search_interests(queries, k, exclude)
    assert ids.shape == scores.shape == interests.shape == (B, k)
    assert ids.dtype == interests.dtype == np.int64 and scores.dtype == np.float32
    expected = merged_searches(index, queries, k, exclude)
    np.testing.assert_array_equal(ids, expected[0])
    np.testing.assert_array_equal(scores, expected[1])
    np.testing.assert_array_equal(interests, expected[2])


@pytest.mark.parametrize("kind", kinds(exact_only=True))
def test_an_exact_index_finds_the_true_top_k(corpus, kind: str) -> None:
    vectors, queries, exclude = corpus
    ids, scores, interests = build_index(kind, vectors).search_interests(queries, k, exclude)
    expected_ids, expected_scores, expected_interests = true_top_k(vectors, queries, k, exclude)
    np.testing.assert_array_equal(ids, expected_ids)
    np.testing.assert_allclose(scores, expected_scores, rtol=0, atol=1e-6)
    np.testing.assert_array_equal(interests, expected_interests)


@pytest.mark.parametrize("kind", kinds())
@pytest.mark.parametrize("with_exclude", [False, True])
def test_one_interest_is_search(corpus, kind: str, with_exclude: bool) -> None:
    vectors, queries, exclude = corpus
    exclude = exclude if with_exclude else None
    index = build_index(kind, vectors)
    ids, scores, interests = index.search_interests(queries[:, :1], k, exclude)
    expected_ids, expected_scores = index.search(queries[:, 0], k, exclude)
    np.testing.assert_array_equal(ids, expected_ids)
    np.testing.assert_array_equal(scores, expected_scores)
    np.testing.assert_array_equal(interests, np.where(ids >= 0, 0, -1))


@pytest.mark.parametrize("kind", kinds())
def test_k_above_what_remains_pads_without_duplicates_or_excluded_items(corpus, kind) -> None:
    vectors, queries, _ = corpus
    vectors = vectors[:40]
    rng = np.random.default_rng(1)
    exclude = sp.csr_matrix((rng.random((B, 40)) < 0.5).astype(np.float32))
    ids, scores, interests = build_index(kind, vectors).search_interests(queries, 50, exclude)
    assert ids.shape == (B, 50)
    for row in range(B):
        found = ids[row][ids[row] >= 0]
        assert len(set(found)) == len(found)  # no item twice
        assert not set(found) & set(exclude[row].indices)  # never an excluded item
        assert len(found) <= 40 - exclude[row].nnz
        assert (ids[row, len(found) :] == -1).all()  # padding only at the end
        assert (scores[row, len(found) :] == -np.inf).all()
        assert (interests[row, len(found) :] == -1).all()
        assert ((interests[row, : len(found)] >= 0) & (interests[row, : len(found)] < K)).all()
        assert (np.diff(scores[row, : len(found)]) <= 0).all()  # best first


def test_an_exact_index_returns_everything_that_remains_when_k_is_large(corpus) -> None:
    vectors, queries, _ = corpus
    exclude = sp.csr_matrix((np.random.default_rng(2).random((B, 40)) < 0.5).astype(np.float32))
    ids, _, _ = build_index("exact", vectors[:40]).search_interests(queries, 50, exclude)
    assert ((ids >= 0).sum(axis=1) == 40 - np.diff(exclude.indptr)).all()


def test_equal_scores_go_to_the_lower_interest_and_the_lower_item() -> None:
    index = ExactIndex()
    index.build(np.eye(4, dtype=np.float32))
    #            items: 0    1    2    3
    # interest 0 scores  0.5  0.9  0.0  0.5
    # interest 1 scores  0.5  0.9  0.0  0.0
    # item 1: 0.9 from both interests -> interest 0; items 0 and 3 tie at 0.5 -> 0 first
    queries = np.array([[[0.5, 0.9, 0.0, 0.5], [0.5, 0.9, 0.0, 0.0]]], np.float32)
    ids, scores, interests = index.search_interests(queries, 3)
    assert ids.tolist() == [[1, 0, 3]]
    np.testing.assert_array_equal(scores, np.float32([[0.9, 0.5, 0.5]]))
    assert interests.tolist() == [[0, 0, 0]]
    # the same with the interests swapped and item 3's best in the second one
    ids, scores, interests = index.search_interests(queries[:, ::-1], 4)
    assert ids.tolist() == [[1, 0, 3, 2]]
    assert interests.tolist() == [[0, 0, 1, 0]]


def test_the_best_score_wins_over_the_first_found() -> None:
    index = ExactIndex()
    index.build(np.eye(3, dtype=np.float32))
    # item 2 scores 0.2 for interest 0 and 0.8 for interest 1: it counts at 0.8, found by 1
    queries = np.array([[[1.0, 0.0, 0.2], [0.0, 0.5, 0.8]]], np.float32)
    ids, scores, interests = index.search_interests(queries, 3)
    assert ids.tolist() == [[0, 2, 1]]
    np.testing.assert_array_equal(scores, np.float32([[1.0, 0.8, 0.5]]))
    assert interests.tolist() == [[0, 1, 1]]


def test_bad_arguments_are_refused() -> None:
    index = build_index("exact", np.eye(2, dtype=np.float32))
    with pytest.raises(ValueError, match=r"\(B, K, D\) array with K >= 1, got shape \(1, 2\)"):
        index.search_interests(np.ones((1, 2), np.float32), 1)
    with pytest.raises(ValueError, match=r"K >= 1, got shape \(1, 0, 2\)"):
        index.search_interests(np.ones((1, 0, 2), np.float32), 1)
    with pytest.raises(ValueError, match="width 3, the index 2"):
        index.search_interests(np.ones((1, 2, 3), np.float32), 1)
    with pytest.raises(ValueError, match="k must be"):
        index.search_interests(np.ones((1, 2, 2), np.float32), 0)
    with pytest.raises(ValueError, match=r"exclude must be \(1, 2\)"):
        index.search_interests(np.ones((1, 2, 2), np.float32), 1, exclude=sp.csr_matrix((2, 2)))
    with pytest.raises(ValueError, match="NaN"):
        index.search_interests(np.array([[[1.0, 0.0], [np.nan, 0.0]]], np.float32), 1)
