"""FAISS indexes against the exact reference: recall, exclusion, save and load."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp

from twotower.index import INDEXES, ExactIndex, build_index, load_index

pytest.importorskip("faiss", reason="FAISS indexes need faiss-cpu (the serve extra)")

ANN = ["flat", "hnsw", "ivfpq"]


def clustered(rng: np.random.Generator, count: int, dim: int = 32) -> np.ndarray:
    """Unit vectors around 20 centres, like trained item vectors (not uniform noise)."""
    centres = rng.normal(size=(20, dim))
    vectors = centres[rng.integers(0, 20, count)] + 0.5 * rng.normal(size=(count, dim))
    return (vectors / np.linalg.norm(vectors, axis=1, keepdims=True)).astype(np.float32)


@pytest.fixture(scope="module")
def corpus():
    rng = np.random.default_rng(0)
    return clustered(rng, 3000), clustered(rng, 200)


def recall_against_exact(ids: np.ndarray, exact: np.ndarray) -> float:
    return np.mean([len(set(a) & set(b)) / len(b) for a, b in zip(ids, exact, strict=True)])


@pytest.mark.parametrize("kind, floor", [("flat", 1.0), ("hnsw", 0.95), ("ivfpq", 0.75)])
def test_recall_against_the_exact_index(corpus, kind, floor):
    items, queries = corpus
    exact_ids, exact_scores = build_index("exact", items).search(queries, 10)
    ids, scores = build_index(kind, items).search(queries, 10)
    assert recall_against_exact(ids, exact_ids) >= floor
    assert INDEXES[kind]().is_exact == (kind == "flat")
    if kind == "flat":
        np.testing.assert_allclose(scores, exact_scores, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", ANN)
def test_excluded_items_never_come_back_and_cost_no_recall(corpus, kind):
    items, queries = corpus
    exact = ExactIndex()
    exact.build(items)
    first, _ = exact.search(queries, 5)
    rows = np.repeat(np.arange(len(queries)), 5)
    exclude = sp.csr_matrix((np.ones(rows.size), (rows, first.ravel())), (len(queries), 3000))
    expected, _ = exact.search(queries, 10, exclude=exclude)
    ids, scores = build_index(kind, items).search(queries, 10, exclude=exclude)
    for row in range(len(queries)):
        assert not set(ids[row]) & set(first[row])
    assert (np.diff(scores, axis=1) <= 1e-6).all()  # still best first
    floor = {"flat": 1.0, "hnsw": 0.9, "ivfpq": 0.7}[kind]
    assert recall_against_exact(ids, expected) >= floor


@pytest.mark.parametrize("kind", ANN)
def test_save_and_load_give_the_same_answers(corpus, tmp_path, kind):
    items, queries = corpus
    index = build_index(kind, items)
    index.save(tmp_path / kind)
    loaded = load_index(tmp_path / kind)
    assert type(loaded) is type(index) and loaded.num_items == 3000 and loaded.dim == 32
    for a, b in zip(index.search(queries, 7), loaded.search(queries, 7), strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("kind", ANN)
def test_small_corpus_and_large_k_pad(kind):
    items = clustered(np.random.default_rng(1), 50)
    ids, scores = build_index(kind, items).search(items[:3], 60)
    assert ids.shape == (3, 60)
    assert (ids[:, 50:] == -1).all() and np.isinf(scores[:, 50:]).all()
    assert len(set(ids[0][ids[0] >= 0])) == (ids[0] >= 0).sum()  # no item twice
