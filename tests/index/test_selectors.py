"""Exclusions inside the search: each FAISS index against the search that fetched k
plus the excluded items and dropped them (kept here as the oracle), and every kind
against brute force."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from twotower.index import ExactIndex, build_index
from twotower.index.topk import row_pairs, top_k

faiss = pytest.importorskip("faiss", reason="FAISS indexes need faiss-cpu (the serve extra)")

ANN = ["flat", "hnsw", "ivfpq"]
N, D, B, k = 3000, 32, 40, 10


def clustered(rng: np.random.Generator, count: int) -> np.ndarray:
    """Unit vectors around 20 centres, like trained item vectors."""
    centres = rng.normal(size=(20, D))
    vectors = centres[rng.integers(0, 20, count)] + 0.5 * rng.normal(size=(count, D))
    return (vectors / np.linalg.norm(vectors, axis=1, keepdims=True)).astype(np.float32)


@pytest.fixture(scope="module")
def corpus() -> tuple[np.ndarray, np.ndarray, sp.csr_matrix, np.ndarray]:
    """Items, B queries, their exclusions and a mask of allowed items.

    Each query excludes up to 120 of its own 200 nearest items (as a user's seen items
    lie near the user), except 8 that exclude nothing; queries 10..13 exclude the same
    items; one query excludes every item.
    """
    rng = np.random.default_rng(0)
    items, queries = clustered(rng, N), clustered(rng, B)
    near = np.argsort(-(queries @ items.T), axis=1)[:, :200]
    rows = []
    for b in range(B):
        count = 0 if b < 8 else int(rng.integers(1, 120))
        rows.append(np.sort(rng.choice(near[b], count, replace=False)))
    rows[11] = rows[12] = rows[13] = rows[10]
    rows[20] = np.arange(N)
    indptr = np.concatenate([[0], np.cumsum([len(r) for r in rows])])
    exclude = sp.csr_matrix((np.ones(indptr[-1], np.float32), np.concatenate(rows), indptr), (B, N))
    return items, queries, exclude, rng.random(N) < 0.7


def over_fetched(index, queries, k, exclude, allowed=None):
    """The search as FAISS indexes answered before: FAISS asked for k plus the most
    items a query of the call excludes (with HNSW's walk that wide), among the
    ``allowed`` items, the excluded ones dropped and the first k kept."""
    extra = 0 if exclude is None else int(np.diff(exclude.indptr).max(initial=0))
    wanted = min(k + extra, index.num_items)
    bits = None if allowed is None else np.packbits(allowed, bitorder="little")
    selector = None if bits is None else faiss.IDSelectorBitmap(len(bits), faiss.swig_ptr(bits))
    parameters = index._parameters(wanted, selector)
    scores, ids = index._index.search(queries, wanted, params=parameters)
    bad = ids < 0
    if exclude is not None:
        bad |= (exclude.toarray()[np.arange(len(ids))[:, None], np.maximum(ids, 0)] > 0) & ~bad
    order = np.argsort(bad, axis=1, kind="stable")  # kept results first, in rank order
    ids = np.take_along_axis(np.where(bad, -1, ids), order, axis=1)[:, :k]
    scores = np.take_along_axis(np.where(bad, -np.inf, scores), order, axis=1)[:, :k]
    pad = k - ids.shape[1]
    return (
        np.pad(ids, ((0, 0), (0, pad)), constant_values=-1),
        np.pad(scores, ((0, 0), (0, pad)), constant_values=-np.inf).astype(np.float32),
    )


def brute_force(items, queries, k, exclude, allowed=None):
    """(B, k) the true top k of each query among the allowed items it does not exclude."""
    scores = queries.astype(np.float64) @ items.astype(np.float64).T
    scores[exclude.toarray() > 0] = -np.inf
    if allowed is not None:
        scores[:, ~allowed] = -np.inf
    order = np.lexsort((np.broadcast_to(np.arange(N), scores.shape), -scores), axis=-1)[:, :k]
    return np.where(np.take_along_axis(scores, order, axis=1) > -np.inf, order, -1)


def recall(ids: np.ndarray, truth: np.ndarray) -> float:
    hits = (ids[:, :, None] == truth[:, None, :]).any(axis=1) & (truth >= 0)
    return float(hits.sum() / max((truth >= 0).sum(), 1))


@pytest.fixture(scope="module")
def indexes(corpus) -> dict:
    return {kind: build_index(kind, corpus[0]) for kind in ANN}


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("kind", ANN)
def test_each_query_answers_what_over_fetching_answered_it_alone(corpus, indexes, kind, masked):
    items, queries, exclude, allowed = corpus
    allowed = allowed if masked else None
    ids, scores = indexes[kind].search(queries, k, exclude, allowed)
    for b in range(B):
        alone = over_fetched(indexes[kind], queries[b : b + 1], k, exclude[b], allowed)
        np.testing.assert_array_equal(ids[b], alone[0][0])
        np.testing.assert_array_equal(scores[b], alone[1][0])
    assert (ids[20] == -1).all() and (scores[20] == -np.inf).all()


@pytest.mark.parametrize("kind", ["flat", "ivfpq"])
def test_flat_and_ivfpq_answer_a_batch_as_over_fetching_did(corpus, indexes, kind):
    # they scan what they scan whatever is asked, so only the exclusions' place changed
    items, queries, exclude, allowed = corpus
    for mask in (None, allowed):
        ids, scores = indexes[kind].search(queries, k, exclude, mask)
        old_ids, old_scores = over_fetched(indexes[kind], queries, k, exclude, mask)
        np.testing.assert_array_equal(ids, old_ids)
        # flat: FAISS scores 20 or more queries at once with BLAS, fewer one by one
        np.testing.assert_allclose(scores, old_scores, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("kind", ANN)
def test_no_excluded_item_comes_back_results_are_sorted_and_full(corpus, indexes, kind):
    items, queries, exclude, allowed = corpus
    full = np.arange(B) != 20  # query 20 excludes every item
    for mask in (None, allowed):
        ids, scores = indexes[kind].search(queries, k, exclude, mask)
        rows, cols = np.nonzero(ids >= 0)
        assert not exclude[rows, ids[rows, cols]].any()
        assert mask is None or mask[ids[ids >= 0]].all()
        assert (np.diff(scores[full], axis=1) <= 0).all()
        assert (ids[full] >= 0).all() and (ids[~full] == -1).all()


def test_hnsw_recall_is_that_of_over_fetching_for_a_lone_query(corpus, indexes):
    # a batch answered together each query as it answered it alone; over-fetching in a
    # batch walked every query as wide as the batch's largest exclusion asked for
    items, queries, exclude, allowed = corpus
    truth = brute_force(items, queries, k, exclude)
    ids, _ = indexes["hnsw"].search(queries, k, exclude)
    alone = np.concatenate(
        [over_fetched(indexes["hnsw"], queries[b : b + 1], k, exclude[b])[0] for b in range(B)]
    )
    assert recall(ids, truth) == recall(alone, truth) >= 0.95


@pytest.mark.parametrize("kind", ANN)
def test_one_query_s_exclusions_never_reach_another_s(corpus, indexes, kind):
    items, queries, _, allowed = corpus
    index = indexes[kind]
    same = np.repeat(queries[:1], 3, axis=0)
    first, _ = index.search(same[:1], k, allowed=allowed)
    exclude = sp.csr_matrix(
        (np.ones(k, np.float32), first[0], [0, k, k, k]), shape=(3, N)
    )  # the first query excludes its top k, the others nothing
    ids, _ = index.search(same, k, exclude, allowed)
    assert not set(ids[0]) & set(first[0])
    np.testing.assert_array_equal(ids[1:], np.repeat(first, 2, axis=0))


@pytest.mark.parametrize("share", [0.05, 0.9])  # a narrow mask gathers, a wide one masks
def test_exact_search_with_exclusions_and_a_mask_equals_brute_force(corpus, share):
    items, queries, exclude, _ = corpus
    allowed = np.random.default_rng(3).random(N) < share
    index = ExactIndex(chunk_size=7)
    index.build(items)
    ids, _ = index.search(queries, k, exclude, allowed)
    np.testing.assert_array_equal(ids, brute_force(items, queries, k, exclude, allowed))


def test_row_pairs_reads_any_rows_of_a_csr_matrix():
    rng = np.random.default_rng(4)
    matrix = sp.csr_matrix(rng.random((6, 9)) < 0.4)
    rows = np.array([5, 0, 0, 3, 2])  # out of order, repeated
    positions, columns = row_pairs(matrix, rows)
    coo = matrix[rows].tocoo()
    found = np.stack([positions, columns], axis=1).tolist()
    expected = np.stack([coo.row, coo.col], axis=1).tolist()
    assert sorted(found) == sorted(expected)


def test_top_k_excludes_per_query_for_any_order_of_queries():
    rng = np.random.default_rng(5)
    scores = rng.standard_normal((6, 30)).astype(np.float32)
    exclude = sp.csr_matrix(rng.random((6, 30)) < 0.5)
    query_idx = np.array([4, 1, 4, 0])
    ids, _ = top_k(lambda rows: torch.from_numpy(scores[rows]), query_idx, 5, exclude, 3)
    for position, q in enumerate(query_idx):
        masked = np.where(exclude[q].toarray()[0], -np.inf, scores[q])
        best = np.lexsort((np.arange(30), -masked))[:5]
        np.testing.assert_array_equal(ids[position], np.where(masked[best] > -np.inf, best, -1))


@pytest.mark.parametrize("kind", ANN)
def test_k_above_what_remains_pads_each_query_on_its_own(kind):
    rng = np.random.default_rng(6)
    items = clustered(rng, 60)
    queries = items[:3]
    exclude = sp.csr_matrix(
        (np.ones(15, np.float32), np.r_[0:10, 20:25], [0, 10, 10, 15]), shape=(3, 60)
    )
    ids, scores = build_index(kind, items).search(queries, 80, exclude)
    assert ids.shape == (3, 80)
    assert [int((row >= 0).sum()) for row in ids] == [50, 60, 55]  # every item left
    for row, excluded in zip(ids, (range(10), (), range(20, 25)), strict=True):
        assert not set(row.tolist()) & set(excluded)
        assert len(set(row[row >= 0].tolist())) == (row >= 0).sum()  # no item twice
    assert np.isneginf(scores[ids < 0]).all() and np.isfinite(scores[ids >= 0]).all()
