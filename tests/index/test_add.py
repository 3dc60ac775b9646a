"""Growing an index: ``add`` then search answers as an index built on every vector."""

from __future__ import annotations

import numpy as np
import pytest

from twotower.index import INDEXES, build_index, load_index

KINDS = list(INDEXES)


def clustered(rng: np.random.Generator, count: int, dim: int = 32) -> np.ndarray:
    """Unit vectors around 20 centres, like trained item vectors."""
    centres = rng.normal(size=(20, dim))
    vectors = centres[rng.integers(0, 20, count)] + 0.5 * rng.normal(size=(count, dim))
    return (vectors / np.linalg.norm(vectors, axis=1, keepdims=True)).astype(np.float32)


def needs(kind: str) -> None:
    if kind != "exact":
        pytest.importorskip("faiss", reason="FAISS indexes need faiss-cpu (the serve extra)")


def recall(ids: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([len(set(a) & set(b)) / len(b) for a, b in zip(ids, truth, strict=True)]))


@pytest.fixture(scope="module")
def corpus():
    rng = np.random.default_rng(3)
    return clustered(rng, 2000), clustered(rng, 150)


@pytest.mark.parametrize(
    "kind, floor", [("exact", 1.0), ("flat", 1.0), ("hnsw", 0.95), ("ivfpq", 0.7)]
)
def test_added_vectors_answer_as_an_index_built_on_all_of_them(corpus, kind, floor):
    needs(kind)
    items, queries = corpus
    grown = build_index(kind, items[:1500])
    for start, stop in ((1500, 1501), (1501, 1700), (1700, 2000)):  # three appends
        grown.add(items[start:stop])
    assert grown.num_items == 2000 and grown.dim == 32
    fresh = build_index(kind, items)
    allowed = np.random.default_rng(0).random(2000) < 0.5
    for mask in (None, allowed):
        ids, scores = grown.search(queries, 10, allowed=mask)
        truth, truth_scores = build_index("exact", items).search(queries, 10, allowed=mask)
        if kind in ("exact", "flat"):  # exact search: the very same answers
            want_ids, want_scores = fresh.search(queries, 10, allowed=mask)
            np.testing.assert_array_equal(ids, want_ids)
            np.testing.assert_allclose(scores, want_scores, rtol=1e-6, atol=1e-6)
        assert recall(ids, truth) >= floor
        assert mask is None or mask[ids[ids >= 0]].all()
    assert (grown.search(queries, 10)[0] >= 1500).any()  # added items are found


@pytest.mark.parametrize("kind", KINDS)
def test_an_index_that_grew_saves_and_loads_whole(corpus, kind, tmp_path):
    needs(kind)
    items, queries = corpus
    index = build_index(kind, items[:1000])
    index.add(items[1000:1300])
    index.save(tmp_path / kind)
    loaded = load_index(tmp_path / kind)
    assert loaded.num_items == 1300
    for a, b in zip(index.search(queries, 7), loaded.search(queries, 7), strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("kind", ["flat", "hnsw", "ivfpq"])
def test_a_mapped_faiss_index_refuses_to_grow_and_its_copy_grows(corpus, kind, tmp_path):
    """FAISS aborts the process when a mapped index grows; ``add`` refuses it first."""
    needs(kind)
    items, queries = corpus
    build_index(kind, items[:1000]).save(tmp_path / kind)
    mapped = load_index(tmp_path / kind)
    with pytest.raises(RuntimeError, match="mapped read-only from its file and cannot grow"):
        mapped.add(items[1000:1010])
    assert mapped.num_items == 1000  # untouched, still answering
    copy = mapped.growable()
    assert copy is not mapped and copy.growable() is copy
    copy.add(items[1000:])
    assert (copy.num_items, mapped.num_items) == (2000, 1000)
    fresh = build_index(kind, items)
    if kind == "flat":
        np.testing.assert_array_equal(copy.search(queries, 10)[0], fresh.search(queries, 10)[0])
    in_memory = load_index(tmp_path / kind, mapped=False)
    assert in_memory.growable() is in_memory
    in_memory.add(items[1000:])
    assert in_memory.num_items == 2000


def test_exact_add_keeps_room_and_earlier_views(corpus):
    """Appends reuse the buffer's spare rows: no copy per small add, and a view taken
    before an add still holds the vectors it held."""
    items, queries = corpus
    index = build_index("exact", items[:1000])
    index.add(items[1000:1001])
    buffer = index._buffer
    before = index._vectors
    index.add(items[1001:1010])
    assert index._buffer is buffer  # no new buffer for a small append
    assert before.shape[0] == 1001 and np.array_equal(before.numpy(), items[:1001])
    np.testing.assert_array_equal(index._vectors.numpy(), items[:1010])


@pytest.mark.parametrize("kind", KINDS)
def test_bad_additions_are_refused(corpus, kind):
    needs(kind)
    items, _ = corpus
    with pytest.raises(ValueError, match="add before build"):
        INDEXES[kind]().add(items[:3])
    index = build_index(kind, items[:1000])
    with pytest.raises(ValueError, match="added vectors have width 16, the index 32"):
        index.add(items[:3, :16])
    with pytest.raises(ValueError, match="added vectors contain NaN"):
        index.add(np.full((2, 32), np.nan, np.float32))
    index.add(items[:0])  # nothing to add: nothing changes
    assert index.num_items == 1000
