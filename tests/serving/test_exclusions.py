"""Exclusions inside the search, through the retriever, on every index kind: known
users, cold rows, texts, similar items and filtered requests answer what the search
that fetched k plus the excluded items and dropped them answered (kept here as the
oracle), each query as it was answered alone."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from twotower.index import INDEXES, ann
from twotower.index.base import check_search
from twotower.serving import Result, Retriever
from twotower.serving.catalogue import Catalogue
from twotower.serving.query import Query

faiss = pytest.importorskip("faiss", reason="FAISS indexes need faiss-cpu (the serve extra)")

KINDS = sorted(INDEXES)


def over_fetching(self, queries, k, exclude=None, allowed=None):
    """``FaissIndex.search`` as it was: FAISS asked for k plus the most items a query
    excludes (HNSW's walk that wide), the excluded ones dropped, the first k kept."""
    queries, exclude, allowed = check_search(self, queries, k, exclude, allowed)
    extra = 0 if exclude is None else int(np.diff(exclude.indptr).max(initial=0))
    wanted = min(k + extra, self.num_items)
    bits = None if allowed is None else np.packbits(allowed, bitorder="little")
    selector = None if bits is None else faiss.IDSelectorBitmap(len(bits), faiss.swig_ptr(bits))
    scores, ids = self._index.search(queries, wanted, params=self._parameters(wanted, selector))
    bad = ids < 0
    if exclude is not None:
        bad |= (exclude.toarray()[np.arange(len(ids))[:, None], np.maximum(ids, 0)] > 0) & ~bad
    order = np.argsort(bad, axis=1, kind="stable")[:, :k]  # kept results first, in order
    ids = np.take_along_axis(np.where(bad, -1, ids), order, axis=1)
    scores = np.take_along_axis(np.where(bad, -np.inf, scores), order, axis=1)
    pad = k - ids.shape[1]
    return (
        np.pad(ids, ((0, 0), (0, pad)), constant_values=-1),
        np.pad(scores, ((0, 0), (0, pad)), constant_values=-np.inf).astype(np.float32),
    )


def on_index(folder, kind: str) -> Retriever:
    """A retriever over the artifact in ``folder`` with an index of ``kind`` built on its
    item vectors (no exact search for narrow filters: the index answers them)."""
    artifact = Retriever.load(folder).artifact
    index = INDEXES[kind]()
    index.build(artifact.item_vectors)
    catalogue = Catalogue.exported(artifact.items, artifact.item_vectors, index, artifact.item_key)
    return Retriever(dataclasses.replace(artifact, catalogue=catalogue), exact_filter_limit=0)


def assert_answered_as_before(retriever: Retriever, queries: list[Query], monkeypatch) -> None:
    """Each query alone, and (but on HNSW) the whole batch, answered now as by the old
    search: the same items and scores. On HNSW the old search walked a batch's queries
    as wide as its largest exclusion asked for, so it answered a query in a batch
    otherwise than alone; now each query in a batch is answered as alone."""
    together = retriever.retrieve(queries)
    alone = [retriever.retrieve([query])[0] for query in queries]
    with monkeypatch.context() as patch:
        patch.setattr(ann.FaissIndex, "search", over_fetching)
        before_together = retriever.retrieve(queries)
        before_alone = [retriever.retrieve([query])[0] for query in queries]
    pairs = [*zip(alone, before_alone, strict=True)]
    if not isinstance(retriever.artifact.catalogue.index, ann.HNSWIndex):
        pairs += [*zip(together, before_together, strict=True)]
    for now, then in pairs:
        assert isinstance(now, Result) and isinstance(then, Result)
        assert (now.query, now.items, now.scores) == (then.query, then.items, then.scores)
    for mixed, single in zip(together, alone, strict=True):  # the tower's rounding aside
        assert (mixed.query, mixed.items) == (single.query, single.items)
        np.testing.assert_allclose(mixed.scores, single.scores, rtol=1e-5, atol=1e-6)


def demo_queries(retriever: Retriever, oracle) -> list[Query]:
    """Known users (seen items out, some with exclude_items), cold rows with a
    history, similar items and filtered requests: fewer than 20 queries, which FAISS's
    flat index scores one by one whether searched alone or together."""
    users, item_ids = oracle.query_ids, oracle.item_ids
    rows = retriever.artifact.queries.slice(0, 3).to_pylist()
    cold = [
        Query(features={**row, "user_id": -1}, history=oracle.item_ids[10 + i : 40 + i], k=8)
        for i, row in enumerate(rows)
    ]
    return [
        Query(user=users[0], k=10),
        Query(user=users[1], k=5, exclude_items=tuple(oracle.item_ids[:30])),
        Query(user=users[2], k=10, exclude_seen=False),
        Query(user=users[3], k=10, exclude_items=tuple(oracle.item_ids[:30])),
        *cold,
        Query(item=oracle.item_ids[4], k=6),
        Query(item=oracle.item_ids[5], k=6, filter={"category": {"in": ["c1", "c2"]}}),
        Query(user=users[4], k=7, filter={"category": {"in": ["c1", "c3"]}}),
        Query(user=users[5], k=7, filter={"price": {"lt": 20}}),
        Query(user=users[6], k=7, filter={"price": {"lt": 20}}, exclude_items=(item_ids[7],)),
    ]


@pytest.mark.parametrize("kind", KINDS)
def test_users_rows_items_and_filters_are_answered_as_before(demo_artifact, kind, monkeypatch):
    folder, oracle = demo_artifact
    retriever = on_index(folder, kind)
    queries = demo_queries(retriever, oracle)
    assert_answered_as_before(retriever, queries, monkeypatch)
    for query, answer in zip(queries, retriever.retrieve(queries), strict=True):
        assert not set(answer.items) & set(query.exclude_items)
        if query.user is not None and query.exclude_seen:
            seen = oracle.seen[oracle.query_ids.index(query.user)]
            assert not set(answer.items) & {oracle.item_ids[i] for i in np.flatnonzero(seen)}
        if query.history is not None:
            assert not set(answer.items) & set(query.history)
        if query.item is not None:
            assert query.item not in answer.items


@pytest.mark.parametrize("kind", KINDS)
def test_texts_are_answered_as_before(text_artifact, kind, monkeypatch):
    retriever = on_index(text_artifact[0], kind)
    ids = retriever.item_id_values.tolist()
    texts = ["red shoes", "Blue HAT!", "nothing known", "red"]
    queries = [Query(text=t, k=6, exclude_items=tuple(ids[::3])) for t in texts]
    queries += [Query(text=t, k=6) for t in texts]
    assert_answered_as_before(retriever, queries, monkeypatch)
