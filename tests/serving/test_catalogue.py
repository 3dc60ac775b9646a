"""The catalogue's rows and slots: a changed catalogue searches as exact search over its
live items' current vectors, by row, whatever the index kind."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
import scipy.sparse as sp

from twotower.errors import DataError
from twotower.index import INDEXES, build_index
from twotower.serving.catalogue import Catalogue, ItemUpdate

DIM = 16


def unit(rng: np.random.Generator, count: int) -> np.ndarray:
    vectors = rng.normal(size=(count, DIM))
    return (vectors / np.linalg.norm(vectors, axis=1, keepdims=True)).astype(np.float32)


def needs(kind: str) -> None:
    if kind != "exact":
        pytest.importorskip("faiss", reason="FAISS indexes need faiss-cpu (the serve extra)")


def exported(kind: str, count: int = 400, seed: int = 0) -> Catalogue:
    rng = np.random.default_rng(seed)
    items = pa.table({"id": np.arange(count) * 10, "name": [f"item {i}" for i in range(count)]})
    vectors = unit(rng, count)
    return Catalogue.exported(items, vectors, build_index(kind, vectors), "id")


def update(ids: list, seed: int, **lists) -> ItemUpdate:
    rows = pa.table({"id": pa.array(ids, pa.int64()), "name": [f"new {i}" for i in ids]})
    return ItemUpdate(rows, unit(np.random.default_rng(seed), len(ids)), **lists)


def truth(catalogue: Catalogue, queries: np.ndarray, k: int, allowed=None) -> np.ndarray:
    """Exact top k by row over the live rows' current vectors (the oracle)."""
    live = ~catalogue.blocked & ~catalogue.removed
    if allowed is not None:
        live &= allowed
    rows = np.flatnonzero(live)
    scores = queries @ catalogue.item_vectors[rows].T
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return rows[order]


def changed(kind: str) -> tuple[Catalogue, Catalogue]:
    """A catalogue and its version after: rows 3 and 7 replaced, two new items, row
    5 blocked, row 9 removed; then row 5 unblocked and row 11 blocked."""
    first = exported(kind)
    second = first.apply(update([30, 70, 5001, 5002], 1, blocked=(50,), removed=(90,)))
    third = second.apply(update([], 2, unblocked=(50,), blocked=(110,)))
    return first, third


@pytest.mark.parametrize("kind", list(INDEXES))
def test_a_changed_catalogue_searches_its_live_items_by_row(kind):
    needs(kind)
    _, catalogue = changed(kind)
    assert catalogue.num_items == 402 and catalogue.slots == 404
    assert catalogue.rows([30, 5001, 5002, 90, 110, 50]).tolist() == [3, 400, 401, -1, 11, 5]
    assert catalogue.find([90]).tolist() == [9]  # removed: the row stays, unknown
    assert catalogue.items.column("name").to_pylist()[3] == "new 30"
    assert catalogue.items.column("id").to_pylist()[400:] == [5001, 5002]
    queries = unit(np.random.default_rng(9), 60)
    allowed = np.random.default_rng(4).random(402) < 0.6
    for mask in (None, allowed):
        rows, scores, interests = catalogue.search(queries, 10, allowed=mask)
        assert interests is None
        assert not np.isin(rows, [9, 11]).any()  # removed, blocked
        assert mask is None or mask[rows].all()
        want = truth(catalogue, queries, 10, mask)
        if INDEXES[kind]().is_exact:
            np.testing.assert_array_equal(rows, want)
            expected = np.take_along_axis(queries @ catalogue.item_vectors.T, rows, axis=1)
            np.testing.assert_allclose(scores, expected, atol=1e-5)
        else:
            hits = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(rows, want, strict=True)])
            assert hits >= 0.8
    # the replaced rows' current vectors are searched, not their first ones
    target = catalogue.item_vectors[[3, 400]]
    assert catalogue.search(target, 1)[0][:, 0].tolist() == [3, 400]


@pytest.mark.parametrize("kind", list(INDEXES))
def test_an_earlier_version_still_answers_as_before(kind):
    """Its index grew in place; the slots it does not know are never its answers."""
    needs(kind)
    first = exported(kind)
    queries = unit(np.random.default_rng(5), 30)
    before = first.search(queries, 10)
    later = first.apply(update([10, 20, 6000], 3, removed=(0,)))
    assert later.index is first.index and first.index.num_items == 403  # grown in place
    after = first.search(queries, 10)
    for a, b in zip(before[:2], after[:2], strict=True):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match="only the latest version may apply"):
        first.apply(update([7000], 4))
    assert later.rows([0, 6000]).tolist() == [-1, 400]


@pytest.mark.parametrize("kind", list(INDEXES))
def test_each_query_s_excluded_rows_are_left_out_of_a_changed_catalogue_s_search(kind):
    """Exclusions are rows, the index speaks slots: a replaced row (3, 7) has a new slot,
    an added one (400, 401) a slot after the exported ones; each query leaves out its
    own rows, whatever the index kind."""
    needs(kind)
    _, catalogue = changed(kind)
    queries = unit(np.random.default_rng(7), 12)
    allowed = np.random.default_rng(8).random(402) < 0.8
    best = truth(catalogue, queries, 4)
    odd = [7, 401]  # the odd queries leave these out too
    excluded = [sorted({*best[b].tolist(), 3, 400, *(odd if b % 2 else [])}) for b in range(12)]
    indptr = np.cumsum([0, *map(len, excluded)])
    columns = np.concatenate(excluded)
    exclude = sp.csr_matrix((np.ones(len(columns)), columns, indptr), shape=(12, 402))
    for mask in (None, allowed):
        rows, scores, _ = catalogue.search(queries, 6, exclude, mask)
        for b in range(12):
            assert not set(rows[b].tolist()) & {*excluded[b], 9, 11}  # 9 removed, 11 blocked
            assert mask is None or mask[rows[b]].all()
        assert (rows >= 0).all() and (np.diff(scores, axis=1) <= 0).all()
        if INDEXES[kind]().is_exact:
            for b in range(12):
                banned = np.zeros(402, bool)
                banned[excluded[b]] = True
                keep = ~banned if mask is None else ~banned & mask
                want = truth(catalogue, queries[b : b + 1], 6, keep)
                np.testing.assert_array_equal(rows[b], want[0])


def test_exclusions_are_rows_and_multi_interest_queries_map_too():
    catalogue = changed("exact")[1]
    queries = unit(np.random.default_rng(6), 4)
    best = catalogue.search(queries, 3)[0]
    exclude = sp.csr_matrix(
        (np.ones(best.size), (np.repeat(np.arange(4), 3), best.ravel())), shape=(4, 402)
    )
    rows, _, _ = catalogue.search(queries, 3, exclude)
    assert not (rows[:, :, None] == best[:, None, :]).any()
    np.testing.assert_array_equal(rows, truth(catalogue, queries, 6)[:, 3:])
    stacked = np.stack([queries, queries[::-1]], axis=1)  # (4, 2, D)
    rows, scores, interests = catalogue.search(stacked, 5)
    assert interests.shape == (4, 5) and not np.isin(rows, [9, 11]).any()
    with pytest.raises(
        ValueError, match=r"allowed must be a \(402,\) bool array over the item rows"
    ):
        catalogue.search(queries, 3, allowed=np.ones(404, bool))
    with pytest.raises(ValueError, match="exclude must have 402 columns"):
        catalogue.search(queries, 3, sp.csr_matrix((4, 404)))


def test_an_unchanged_export_searches_without_a_mask(monkeypatch):
    catalogue = exported("exact")
    seen = []
    search = catalogue.index.search
    monkeypatch.setattr(
        catalogue.index, "search", lambda q, k, e=None, a=None: seen.append(a) or search(q, k, e, a)
    )
    catalogue.search(unit(np.random.default_rng(1), 2), 4)
    assert seen == [None]


def test_a_removed_item_given_again_is_back_and_unblocked():
    catalogue = exported("exact")
    catalogue = catalogue.apply(update([], 1, blocked=(20,)))
    catalogue = catalogue.apply(update([], 2, removed=(20,)))
    assert catalogue.rows([20]).tolist() == [-1]
    back = catalogue.apply(update([20], 3))
    assert back.rows([20]).tolist() == [2] and not back.blocked[2] and not back.removed[2]
    assert back.search(back.item_vectors[[2]], 1)[0].tolist() == [[2]]


def test_an_update_naming_an_unknown_item_or_misfit_vectors_is_refused():
    catalogue = exported("exact")
    with pytest.raises(DataError, match=r"v2 blocks item\(s\) the artifact does not hold: \[77\]"):
        catalogue.apply(update([], 1, blocked=(77,)), "v2")
    rows = pa.table({"id": pa.array([1], pa.int64()), "name": ["x"]})
    with pytest.raises(DataError, match=r"\(2, 16\) vectors for 1 rows of width 16"):
        catalogue.apply(ItemUpdate(rows, np.zeros((2, DIM), np.float32)))
