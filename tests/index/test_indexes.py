"""Indexes: one contract for every kind, checked against a numpy argsort oracle."""

from __future__ import annotations

import json

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from twotower.errors import ConfigError, DataError
from twotower.index import INDEXES, ExactIndex, build_index, load_index


def brute_force(vectors: np.ndarray, queries: np.ndarray, k: int, exclude=None, allowed=None):
    """Full sort of every row by (score descending, item row ascending), in float64."""
    scores = queries.astype(np.float64) @ vectors.astype(np.float64).T  # (B, N)
    if exclude is not None:
        scores[exclude.toarray() > 0] = -np.inf
    if allowed is not None:
        scores[:, ~allowed] = -np.inf
    rows = np.broadcast_to(np.arange(scores.shape[1]), scores.shape)
    order = np.lexsort((rows, -scores), axis=-1)[:, :k]
    top = np.take_along_axis(scores, order, axis=1)
    ids = np.where(top == -np.inf, -1, order)
    pad = k - ids.shape[1]
    ids = np.pad(ids, ((0, 0), (0, pad)), constant_values=-1)
    top = np.pad(top, ((0, 0), (0, pad)), constant_values=-np.inf)
    return ids.astype(np.int64), top.astype(np.float32)


def random_exclude(rng: np.random.Generator, shape: tuple[int, int]) -> sp.csr_matrix:
    dense = rng.random(shape) < 0.3
    dense[1] = True  # a query with every item excluded: all padding
    return sp.csr_matrix(dense.astype(np.float32))


def recall(ids: np.ndarray, expected: np.ndarray) -> float:
    hits = [len(set(a[a >= 0]) & set(b[b >= 0])) for a, b in zip(ids, expected, strict=True)]
    return sum(hits) / max((expected >= 0).sum(), 1)


@pytest.mark.parametrize("kind", sorted(INDEXES))
@pytest.mark.parametrize("with_exclude", [False, True])
def test_search_matches_the_oracle(kind: str, with_exclude: bool) -> None:
    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((200, 16)).astype(np.float32)
    queries = rng.standard_normal((12, 16)).astype(np.float32)
    exclude = random_exclude(rng, (12, 200)) if with_exclude else None
    index = build_index(kind, vectors)
    ids, scores = index.search(queries, 10, exclude=exclude)
    expected_ids, expected_scores = brute_force(vectors, queries, 10, exclude)
    assert ids.shape == scores.shape == (12, 10)
    assert ids.dtype == np.int64 and scores.dtype == np.float32
    if exclude is not None:
        assert (ids[1] == -1).all() and (scores[1] == -np.inf).all()
        rows, cols = np.nonzero(ids >= 0)
        assert not exclude[rows, ids[rows, cols]].any()  # never an excluded item
    if index.is_exact:
        np.testing.assert_array_equal(ids, expected_ids)
        np.testing.assert_allclose(scores, expected_scores, rtol=1e-5, atol=1e-5)
    else:
        # 200 uniform random vectors are the worst case for compression: IVF-PQ's
        # floor is lower here; test_ann.py measures it on clustered vectors
        assert recall(ids, expected_ids) >= (0.6 if kind == "ivfpq" else 0.9)


@pytest.mark.parametrize("kind", sorted(INDEXES))
@pytest.mark.parametrize("share", [0.05, 0.3, 0.9])  # narrow masks gather, wide ones mask
def test_only_allowed_items_are_returned_as_exact_filtered_search(kind: str, share: float) -> None:
    rng = np.random.default_rng(2)
    vectors = rng.standard_normal((300, 16)).astype(np.float32)
    queries = rng.standard_normal((12, 16)).astype(np.float32)
    allowed = rng.random(300) < share
    exclude = random_exclude(rng, (12, 300))
    index = build_index(kind, vectors)
    ids, scores = index.search(queries, 10, exclude=exclude, allowed=allowed)
    expected_ids, expected_scores = brute_force(vectors, queries, 10, exclude, allowed)
    found = ids[ids >= 0]
    assert allowed[found].all()  # never an item outside the mask, whatever the index
    rows, cols = np.nonzero(ids >= 0)
    assert not exclude[rows, ids[rows, cols]].any()
    if index.is_exact:
        np.testing.assert_array_equal(ids, expected_ids)
        np.testing.assert_allclose(scores, expected_scores, rtol=1e-5, atol=1e-5)
    elif kind == "hnsw":  # walks the whole graph, returns the allowed it meets
        assert recall(ids, expected_ids) >= 0.9


@pytest.mark.parametrize("kind", sorted(INDEXES))
def test_a_mask_that_allows_nothing_or_few_pads(kind: str) -> None:
    vectors = np.eye(4, dtype=np.float32)
    index = build_index("exact" if kind == "ivfpq" else kind, vectors)  # IVF-PQ needs 39+
    queries = np.ones((2, 4), np.float32)
    ids, scores = index.search(queries, 3, allowed=np.zeros(4, bool))
    assert (ids == -1).all() and (scores == -np.inf).all()
    ids, _ = index.search(queries, 3, allowed=np.array([False, True, False, True]))
    if not index.is_exact or kind == "flat":  # FAISS orders equal scores its own way
        ids[:, :2].sort(axis=1)
    assert ids.tolist() == [[1, 3, -1], [1, 3, -1]]
    ids, _, interests = index.search_interests(
        queries[:, None], 3, allowed=np.eye(4, dtype=bool)[2]
    )
    assert ids.tolist() == [[2, -1, -1]] * 2 and interests.tolist() == [[0, -1, -1]] * 2


@pytest.mark.parametrize("chunk_size", [1, 3, 64])
def test_exact_ties_go_to_the_lower_row_for_any_chunk_size(chunk_size: int) -> None:
    rng = np.random.default_rng(1)
    # Small integers: every product is exact in float32 and ties are everywhere.
    vectors = rng.integers(-1, 2, size=(40, 3)).astype(np.float32)
    queries = rng.integers(-1, 2, size=(9, 3)).astype(np.float32)
    exclude = random_exclude(rng, (9, 40))
    index = ExactIndex(chunk_size=chunk_size)
    index.build(vectors)
    for k in (1, 7, 40, 45):
        ids, scores = index.search(queries, k, exclude=exclude)
        expected_ids, expected_scores = brute_force(vectors, queries, k, exclude)
        np.testing.assert_array_equal(ids, expected_ids)
        np.testing.assert_array_equal(scores, expected_scores)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_exact_on_cuda_equals_exact_on_cpu() -> None:
    rng = np.random.default_rng(3)
    vectors = rng.integers(-2, 3, size=(300, 8)).astype(np.float32)
    queries = rng.integers(-2, 3, size=(20, 8)).astype(np.float32)
    exclude = random_exclude(rng, (20, 300))
    answers = []
    for device in ("cpu", "cuda"):
        index = ExactIndex(chunk_size=7, device=device)
        index.build(vectors)
        answers.append(index.search(queries, 12, exclude=exclude))
    for a, b in zip(*answers, strict=True):
        np.testing.assert_array_equal(a, b)


def test_k_above_the_corpus_pads_with_minus_one_and_minus_inf() -> None:
    index = build_index("exact", np.eye(3, dtype=np.float32))
    ids, scores = index.search(np.array([[0.0, 1.0, 0.5]], np.float32), 5)
    assert ids.tolist() == [[1, 2, 0, -1, -1]]
    assert scores.tolist() == [[1.0, 0.5, 0.0, -np.inf, -np.inf]]


@pytest.mark.parametrize("kind", sorted(INDEXES))
def test_save_then_load_gives_the_same_answers(kind: str, tmp_path) -> None:
    rng = np.random.default_rng(2)
    vectors = rng.standard_normal((50, 8)).astype(np.float32)
    queries = rng.standard_normal((5, 8)).astype(np.float32)
    index = build_index(kind, vectors)
    index.save(tmp_path)
    loaded = load_index(tmp_path)
    assert type(loaded) is type(index) and loaded.is_exact == index.is_exact
    assert (loaded.num_items, loaded.dim) == (50, 8)
    for a, b in zip(index.search(queries, 7), loaded.search(queries, 7), strict=True):
        np.testing.assert_array_equal(a, b)


def test_building_copies_the_vectors() -> None:
    vectors = np.eye(2, dtype=np.float32)
    index = build_index("exact", vectors)
    vectors[:] = 0
    ids, _ = index.search(np.array([[1.0, 0.0]], np.float32), 1)
    assert ids.tolist() == [[0]]


def test_bad_arguments_are_refused() -> None:
    with pytest.raises(ConfigError, match="unknown index 'annoy'; choose one of exact"):
        build_index("annoy", np.eye(2, dtype=np.float32))
    with pytest.raises(ValueError, match="NaN"):
        build_index("exact", np.array([[np.nan, 1.0]], np.float32))
    with pytest.raises(ValueError, match="before build"):
        ExactIndex().search(np.ones((1, 2), np.float32), 1)
    index = build_index("exact", np.eye(2, dtype=np.float32))
    with pytest.raises(ValueError, match="width 3, the index 2"):
        index.search(np.ones((1, 3), np.float32), 1)
    with pytest.raises(ValueError, match="k must be"):
        index.search(np.ones((1, 2), np.float32), 0)
    with pytest.raises(ValueError, match=r"exclude must be \(1, 2\)"):
        index.search(np.ones((1, 2), np.float32), 1, exclude=sp.csr_matrix((2, 2)))
    with pytest.raises(ValueError, match=r"allowed must be a \(2,\) bool array, got int64"):
        index.search(np.ones((1, 2), np.float32), 1, allowed=np.ones(2, np.int64))
    with pytest.raises(ValueError, match=r"allowed must be a \(2,\) bool array"):
        index.search(np.ones((1, 2), np.float32), 1, allowed=np.ones(3, bool))


def test_loading_refuses_a_newer_format_an_unknown_kind_and_bad_vectors(tmp_path) -> None:
    build_index("exact", np.eye(2, dtype=np.float32)).save(tmp_path)
    meta_file = tmp_path / "index.json"
    meta = json.loads(meta_file.read_text())
    meta_file.write_text(json.dumps({**meta, "format_version": 99}))
    with pytest.raises(DataError, match="index.json: index format version 99 is not 1"):
        load_index(tmp_path)
    meta_file.write_text(json.dumps({**meta, "kind": "annoy"}))
    with pytest.raises(DataError, match="unknown index kind 'annoy'"):
        load_index(tmp_path)
    meta_file.write_text(json.dumps({**meta, "num_items": 3}))
    with pytest.raises(DataError, match=r"vectors.npy: expected \(3, 2\) float32"):
        load_index(tmp_path)
    (tmp_path / "vectors.npy").write_bytes(b"not an array")
    meta_file.write_text(json.dumps(meta))
    with pytest.raises(DataError, match="vectors.npy: not a readable array"):
        load_index(tmp_path)
