"""The working state of one ``Retriever.retrieve`` call: one slot per query, held as
arrays over the micro-batch, and what each query leaves out of its search.

The queries' fields are read once, into columns (``ks``, ``exclude_seen``, which
sources each names); every later step (grouping by source, gathering known users'
vectors, the exclusions, the results) works on positions and those columns, over the
whole batch at once. Python runs per query only where a query brings its own
Python values (its feature row, its history, its list of ids) or fails.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from operator import attrgetter
from typing import Any

import numpy as np
import scipy.sparse as sp

from twotower.errors import DataError
from twotower.index.topk import row_pairs
from twotower.serving.artifact import Artifact
from twotower.serving.query import SOURCES, Query, Result, check_k

# which of a query's fields are given, as the columns of ``QueryBatch.given``
GIVEN = (*SOURCES, "history")
_FEATURES, _HISTORY = GIVEN.index("features"), GIVEN.index("history")
_BITS = 1 << np.arange(len(GIVEN))  # a row of ``given`` as one number: bit i for GIVEN[i]


def _source_codes() -> np.ndarray:
    """(2 ** len(GIVEN),) int64: for each set of given fields (bit i: GIVEN[i]), the
    source ``Query.source`` names (its position in SOURCES), or -1 where it refuses it."""
    codes = np.full(1 << len(GIVEN), -1, dtype=np.int64)
    for fields in range(len(codes)):
        query = Query(**{name: 0 for i, name in enumerate(GIVEN) if fields >> i & 1})
        with contextlib.suppress(DataError):  # refused: stays -1
            codes[fields] = SOURCES.index(query.source)
    return codes


_SOURCE_CODES = _source_codes()  # the rule of ``Query.source``, as a table


class QueryBatch:
    """One slot per query: its vector, label, what it read and what it leaves out.

    Args:
        queries: the batch's queries.
        dim: D, the query vectors' width.
        interests: K, the vectors per query (1 unless multi-interest).
    """

    def __init__(self, queries: Sequence[Query], dim: int, interests: int) -> None:
        B = len(queries)
        self.queries = list(queries)
        self.out = np.full(B, None, dtype=object)  # each Result or DataError, once known
        self.labels = np.full(B, None, dtype=object)  # what each result is labelled with
        shape = (B, dim) if interests == 1 else (B, interests, dim)
        self.vectors = np.zeros(shape, dtype=np.float32)  # (B, D) or (B, K, D) queries
        self.seen_rows = np.full(B, -1, dtype=np.int64)  # query rows whose seen items go
        self.seen_items: list[np.ndarray | None] = [None] * B  # or the item rows that go
        self.states = np.full(B, None, dtype=object)  # what each read (Result.state)
        self.self_rows = np.full(B, -1, dtype=np.int64)  # item rows excluded as themselves
        self.ks = np.ones(B, dtype=np.int64)  # each valid query's k, at most N
        self.sources = np.full(B, "tower", dtype=object)  # Result.vector of each
        self.given = np.zeros((B, len(GIVEN)), dtype=bool)  # (B, 5) which fields are set
        for column, name in enumerate(GIVEN):
            self.given[:, column] = [value is not None for value in map(attrgetter(name), queries)]
        self.exclude_seen = np.fromiter(map(attrgetter("exclude_seen"), queries), bool, B)
        self.filtered = np.fromiter(
            (f is not None for f in map(attrgetter("filter"), queries)), bool, B
        )

    @property
    def result_columns(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The (B,) columns a ``Result`` takes besides its items: labels, vector
        sources and states read."""
        return self.labels, self.sources, self.states

    def plan(self, num_items: int) -> dict[str, np.ndarray]:
        """Checks every query's k and source; fails the queries at fault (their errors
        in ``out``) and sets the others' ``ks`` (at most ``num_items``).

        Returns:
            The positions of the valid queries of each source.
        """
        ok = self._check_ks(num_items)
        codes = _SOURCE_CODES[self.given @ _BITS]  # (B,) each query's source, or -1
        for position in np.flatnonzero(ok & (codes < 0)).tolist():
            try:
                self.queries[position].source  # noqa: B018 (raises, naming the fault)
            except DataError as err:
                self.out[position] = err
            ok[position] = False
        return {name: np.flatnonzero(ok & (codes == code)) for code, name in enumerate(SOURCES)}

    def _check_ks(self, num_items: int) -> np.ndarray:
        """(B,) bool: the queries whose k is an integer >= 1 (their ``ks`` set, at most
        ``num_items``); the others failed."""
        ks = list(map(attrgetter("k"), self.queries))
        if set(map(type, ks)) <= {int}:  # every k a plain integer: compared at once
            values = np.array(ks)  # int64, or objects for integers beyond its range
            ok = (values >= 1).astype(bool)
            self.ks[ok] = np.minimum(values[ok], num_items).astype(np.int64)
            suspects = np.flatnonzero(~ok)
        else:
            ok, suspects = np.ones(len(ks), dtype=bool), np.arange(len(ks))
        for position in suspects.tolist():
            try:
                check_k(ks[position])
                self.ks[position] = min(ks[position], num_items)
            except DataError as err:
                self.out[position] = err
                ok[position] = False
        return ok

    def resolve(self, positions: np.ndarray, rows: np.ndarray, error: type, source: str):
        """Fails the positions whose id matched no row (-1); returns the others."""
        for position in positions[rows < 0].tolist():
            self.out[position] = error([getattr(self.queries[position], source)])
        return positions[rows >= 0]

    def bare(self, positions: np.ndarray) -> np.ndarray:
        """(P,) bool: which queries at ``positions`` bring no feature values nor history."""
        return ~self.given[positions, _FEATURES] & ~self.given[positions, _HISTORY]

    def history_alone(self, positions: np.ndarray) -> np.ndarray:
        """(P,) bool: which queries at ``positions`` bring a history and no feature values."""
        return self.given[positions, _HISTORY] & ~self.given[positions, _FEATURES]

    def relabel(self, positions: np.ndarray, labels: list[Any]) -> None:
        """Labels the results at ``positions``, one label each."""
        self.labels[positions] = _objects(labels)

    def answer(self, positions: np.ndarray, results: list[Result]) -> None:
        """Puts one ``Result`` in each of the slots at ``positions``."""
        self.out[positions] = _objects(results)

    def pending(self) -> np.ndarray:
        """The positions not yet answered nor failed."""
        return np.flatnonzero(np.equal(self.out, None))

    def answers(self) -> list[Result | DataError]:
        """Every slot's answer, in order."""
        return self.out.tolist()

    def exclusions(self, positions: np.ndarray, artifact: Artifact) -> sp.csr_matrix | None:
        """(P, N) what the queries at ``positions`` leave out: each one's seen items, its
        ``exclude_items`` and an item itself; None when nothing is left out.

        The (query, item row) pairs of the whole batch are gathered at once, and the
        CSR arrays built from them directly, in time proportional to the excluded
        items: nothing here walks the N columns, nor builds a matrix per query.
        """
        P, N = len(positions), artifact.catalogue.num_items
        seen = self.seen_rows[positions]
        has_seen = seen >= 0
        at, cols = row_pairs(artifact.seen, seen[has_seen])  # grouped by query, in order
        at = np.flatnonzero(has_seen)[at]
        listed_at, listed = self._listed(positions, artifact)
        self_rows = self.self_rows[positions]
        itself = np.flatnonzero(self_rows >= 0)
        if len(listed) or len(itself):  # more than the seen items: regrouped by query
            at = np.concatenate([at, listed_at, itself])
            cols = np.concatenate([cols, listed, self_rows[itself]])
            known = cols >= 0  # unknown ids can never be returned anyway
            order = np.argsort(at[known], kind="stable")
            at, cols = at[known][order], cols[known][order]
        if not len(cols):
            return None
        indptr = np.zeros(P + 1, dtype=np.int64)
        np.cumsum(np.bincount(at, minlength=P), out=indptr[1:])
        ones = np.ones(len(cols), dtype=np.float32)
        return sp.csr_matrix((ones, cols, indptr), shape=(P, N))  # repeats allowed

    def _listed(self, positions: np.ndarray, artifact: Artifact) -> tuple[np.ndarray, np.ndarray]:
        """(query, item row) pairs of the items the queries at ``positions`` list
        themselves: a state's seen items (a changed user's, a request's history) and
        ``exclude_items`` (-1 for an id the catalogue does not know)."""
        states = [self.seen_items[i] for i in positions.tolist()]
        named = [self.queries[i].exclude_items for i in positions.tolist()]
        if not any(s is not None and len(s) for s in states) and not any(map(len, named)):
            return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
        counts = [0 if s is None else len(s) for s in states] + [len(n) for n in named]
        at = np.repeat(np.tile(np.arange(len(positions)), 2), counts)
        rows = artifact.item_rows([item for items in named for item in items])
        cols = np.concatenate([*(s for s in states if s is not None), rows]).astype(np.int64)
        return at, cols


def _objects(values: list[Any]) -> np.ndarray:
    """``values`` as a 1-d object array, one element each (a list stays one element)."""
    array = np.empty(len(values), dtype=object)
    if any(isinstance(value, (list, tuple, np.ndarray)) for value in values):
        for place, value in enumerate(values):
            array[place] = value
    else:
        array[:] = values
    return array
