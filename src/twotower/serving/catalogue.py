"""The items an artifact serves: by row for everything a request sees, by slot in the index.

An item keeps its **row** for as long as the artifact lives: the rows of items.parquet
first, then each item an update adds, in order. Replacing an item's raw row (a new
price, a new title) changes what its row holds, never which row it is, so a user's
recent items and seen items (stored as rows) stay right. A request, a result and
every table (``items``, ``item_vectors``) speak of rows.

The index speaks of **slots**: it only grows (``Index.add``), never rewrites a vector.
The rows of items.parquet are slots 0..N-1; each row an update adds or replaces gets
its new vector in the next slot, and its old slot (if any) is simply never returned
again. So:

    slot_rows   (S,)  the row each slot's vector belongs (belonged) to
    row_slots   (N,)  each row's current slot
    blocked     (N,)  rows kept but never returned (out of stock), until unblocked
    removed     (N,)  rows gone: never returned, and their ids unknown from then on
    live        (S,)  a slot that may be returned: its row's current slot, neither
                      blocked nor removed

``search`` takes what a caller says in rows (each query's exclusions, a mask of the
allowed rows) to slots, asks the index, and gives rows back: nothing outside this
module knows that slots exist. The index leaves both out inside its search (each
query's excluded slots and the mask of live, allowed slots as one selector), never
by fetching more and dropping.

A narrow mask of allowed rows (a filter that keeps few items) is searched exactly
instead, over those rows' vectors, when the index is approximate: HNSW walks and IVF
probes past the items such a mask leaves out and may find fewer than k of those it
keeps, or miss the best of them; vector databases answer such a filter by brute force
over the items it keeps, and so does this (``exact_limit``; its default,
``settings.EXACT_FILTER_LIMIT``, is measured in docs/benchmarks.md). The exact search
reads ``item_vectors`` in place (a mapped file stays mapped) and scores only the kept
rows. An artifact with no update has slot i = row i and
everything live, and searches exactly as before (no mask, no mapping).

``apply`` makes the next version from an ``ItemUpdate``: a new ``Catalogue`` (the
tables and masks are new arrays), whose index is this one's grown in place (its
``growable`` copy where it is mapped from its file). This catalogue still answers
after that, exactly as before: its mask leaves out the slots it does not know.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import scipy.sparse as sp

from twotower.errors import DataError
from twotower.index import ExactIndex, Index
from twotower.serving.keys import KeyIndex


@dataclasses.dataclass(frozen=True)
class ItemUpdate:
    """What one version changes in the catalogue: as written to disk, and as applied.

    Attributes:
        rows: (R,) the raw item rows added or replaced, with the item table's schema;
            a row whose id the catalogue holds (or held, if removed) replaces that
            id's row, any other is a new item.
        vectors: (R, D) float32 their vectors, row r of ``rows`` in row r.
        blocked: ids this version blocks (as the item table spells them).
        unblocked: ids it unblocks.
        removed: ids it removes.
        added: how many of ``rows`` are new items (new ids, or removed ones back).
        replaced: how many replace the row of an item the catalogue holds.
        version: the artifact version this update makes.
        follows: the fingerprint of the artifact version it was prepared on (written
            only on top of that one); empty for an update read back from disk.
        unchanged: rows given that equal their item's current row (neither embedded
            nor written; reported only).
    """

    rows: pa.Table
    vectors: np.ndarray
    blocked: tuple[Any, ...] = ()
    unblocked: tuple[Any, ...] = ()
    removed: tuple[Any, ...] = ()
    added: int = 0
    replaced: int = 0
    version: int = 0
    follows: str = ""
    unchanged: int = 0

    @property
    def empty(self) -> bool:
        """Whether it changes nothing (no row, no id)."""
        return not (self.rows.num_rows or self.blocked or self.unblocked or self.removed)

    def counts(self) -> dict[str, int]:
        """How many items it adds, replaces, blocks, unblocks and removes."""
        return {
            "added": self.added,
            "replaced": self.replaced,
            "blocked": len(self.blocked),
            "unblocked": len(self.unblocked),
            "removed": len(self.removed),
        }


@dataclasses.dataclass(frozen=True, eq=False)
class Catalogue:
    """The served items by row, their index by slot, and what may be returned.

    Build one with ``Catalogue.exported`` (an artifact's items.parquet, item vectors
    and index) and change it with ``apply``. Read-only once built: safe to share
    between threads.

    Attributes:
        key: the item key column.
        items: (N,) the raw item table, each row as its latest version left it.
        item_vectors: (N, D) float32 each row's current vector.
        index: the item index over slots; it may hold more slots than ``slots`` (a
            later version's), which this catalogue never returns. None for a catalogue
            loaded without its index (``Artifact.load(index=False)``): it cannot search.
        slots: S, the slots this version knows.
        slot_rows: (S,) int64 the row of each slot.
        row_slots: (N,) int64 the current slot of each row.
        blocked: (N,) bool rows never returned until unblocked (their ids stay known).
        removed: (N,) bool rows never returned, whose ids are unknown.
        exported_rows: how many rows items.parquet holds (looked up by ``exported_keys``;
            the rest by a small lookup rebuilt with each update).
        exported_keys: id -> row for the exported rows, built once.
    """

    key: str
    items: pa.Table
    item_vectors: np.ndarray
    index: Index | None
    slots: int
    slot_rows: np.ndarray
    row_slots: np.ndarray
    blocked: np.ndarray
    removed: np.ndarray
    exported_rows: int
    exported_keys: KeyIndex

    @classmethod
    def exported(
        cls, items: pa.Table, item_vectors: np.ndarray, index: Index | None, key: str
    ) -> Catalogue:
        """The catalogue of an export: row i is slot i, every item live.

        Args:
            items: (N,) the raw item table (items.parquet).
            item_vectors: (N, D) their vectors.
            index: the index built on ``item_vectors`` (N slots), or None.
            key: the item key column.
        """
        count = items.num_rows
        rows = np.arange(count, dtype=np.int64)
        return cls(
            key=key,
            items=items,
            item_vectors=item_vectors,
            index=index,
            slots=count,
            slot_rows=rows,
            row_slots=rows,
            blocked=np.zeros(count, dtype=bool),
            removed=np.zeros(count, dtype=bool),
            exported_rows=count,
            exported_keys=KeyIndex(items.column(key).combine_chunks()),
        )

    @property
    def num_items(self) -> int:
        """N, the item rows (removed ones included: rows are never reused)."""
        return self.items.num_rows

    @functools.cached_property
    def item_ids(self) -> pa.Array:
        """(N,) the item keys, by row."""
        return self.items.column(self.key).combine_chunks()

    @functools.cached_property
    def item_id_values(self) -> np.ndarray:
        """(N,) the item keys by row, as numpy (int64, float64 or object)."""
        return self.item_ids.to_numpy(zero_copy_only=False)

    @functools.cached_property
    def added_keys(self) -> KeyIndex | None:
        """id -> row (counted from ``exported_rows``) of the rows updates added."""
        if self.num_items == self.exported_rows:
            return None
        return KeyIndex(self.item_ids.slice(self.exported_rows))

    @functools.cached_property
    def live(self) -> np.ndarray:
        """(S,) bool: the slots a search may return."""
        current = self.row_slots[self.slot_rows] == np.arange(self.slots)
        return current & ~self.blocked[self.slot_rows] & ~self.removed[self.slot_rows]

    @functools.cached_property
    def all_live(self) -> bool:
        """Whether every slot may be returned (no update has hidden any)."""
        return bool(self.live.all())

    @functools.cached_property
    def known(self) -> np.ndarray:
        """(N,) bool: the rows whose ids are known (not removed)."""
        return ~self.removed

    def rows(self, ids: Sequence[Any]) -> np.ndarray:
        """(B,) int64 the rows of these item ids; -1 for an id the catalogue does not
        know (never held, or removed). A blocked item's id is known.

        Ids are matched by value, not type: ``"12"`` finds the integer key 12.
        """
        if not len(ids):
            return np.zeros(0, dtype=np.int64)
        rows = self.find(ids)
        found = rows >= 0
        rows[found] = np.where(self.removed[rows[found]], -1, rows[found])
        return rows

    def find(self, ids: Sequence[Any]) -> np.ndarray:
        """(B,) int64 the rows of these ids, removed ones included; -1 for an id no
        row ever held. Ids match by value, as ``KeyIndex`` matches them; a float id
        also finds its key in a table keyed by floats."""
        ids = self.as_keys(ids)
        rows = self.exported_keys.rows(ids)
        added = self.added_keys
        missing = np.flatnonzero(rows < 0)
        if added is not None and len(missing):
            later = added.rows([ids[i] for i in missing.tolist()])
            rows[missing] = np.where(later >= 0, later + self.exported_rows, -1)
        return rows

    def as_keys(self, ids: Sequence[Any]) -> Sequence[Any]:
        """``ids`` as ``KeyIndex`` finds them: in a table keyed by floats, a float id as
        its text (``KeyIndex`` takes no float for an id, so that 12.0 is no integer key
        12, and looks float keys up by their text)."""
        if pa.types.is_floating(self.items.schema.field(self.key).type):
            return [str(i) if isinstance(i, float) else i for i in ids]
        return ids

    def search(
        self,
        queries: np.ndarray,
        k: int,
        exclude: sp.csr_matrix | None = None,
        allowed: np.ndarray | None = None,
        exact_limit: int = 0,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """The k live items of highest score for each query, in rows.

        Args:
            queries: (B, D) query vectors, or (B, K, D) for K interests per query
                (``Index.search_interests``: each item at its best interest's score).
            k: items per query (>= 1; more than remain pads).
            exclude: (B, N) CSR over item rows: row b's items are never returned for
                query b.
            allowed: (N,) bool over item rows: the only items that may be returned
                (with the live ones); None: every live item.
            exact_limit: on an approximate index, an ``allowed`` that keeps at most
                this many live rows is searched exactly over them (0: never).

        Returns:
            ``(rows, scores, interests)``: (B, k) int64 item rows, best first, and
            float32 scores, -1 / -inf where fewer than k remain; ``interests``
            (B, k) int64 for (B, K, D) queries (which vector found each item), else None.

        Raises:
            ValueError: ``exclude`` or ``allowed`` not over this catalogue's N rows, or
                no index (loaded without one).
        """
        if self.index is None:
            raise ValueError("this catalogue was loaded without its index: it cannot search")
        kept = self._exactly_searched(allowed, exact_limit)
        if kept is not None:  # few allowed on an approximate index: exact over their rows
            return _search(self.exact, queries, k, exclude, kept)
        mask = self._slot_mask(allowed)
        exclude = self._slot_exclude(exclude)
        slots, scores, interests = _search(self.index, queries, k, exclude, mask)
        if self.slots == self.num_items:  # slot i is row i
            return slots, scores, interests
        rows = np.where(slots >= 0, self.slot_rows[np.maximum(slots, 0)], -1)
        return rows, scores, interests

    def searched_exactly(self, allowed: np.ndarray | None, exact_limit: int) -> bool:
        """Whether ``search`` answers ``allowed`` by the exact search over its rows: an
        approximate index, and at most ``exact_limit`` live rows allowed."""
        return self._exactly_searched(allowed, exact_limit) is not None

    def _exactly_searched(self, allowed: np.ndarray | None, exact_limit: int) -> np.ndarray | None:
        """(N,) the rows the exact search keeps, where ``searched_exactly``; else None."""
        if allowed is None or self.index is None or self.index.is_exact or exact_limit <= 0:
            return None
        kept = self._checked(allowed) & self.returnable
        return kept if np.count_nonzero(kept) <= exact_limit else None

    @functools.cached_property
    def returnable(self) -> np.ndarray:
        """(N,) bool: the rows a search may return (neither blocked nor removed)."""
        return ~self.blocked & ~self.removed

    @functools.cached_property
    def exact(self) -> ExactIndex:
        """The exact index over ``item_vectors`` themselves (no copy), by row."""
        return ExactIndex.over(self.item_vectors)

    def _checked(self, allowed: np.ndarray) -> np.ndarray:
        allowed = np.asarray(allowed)
        if allowed.dtype != np.bool_ or allowed.shape != (self.num_items,):
            raise ValueError(
                f"allowed must be a ({self.num_items},) bool array over the item rows, "
                f"got {allowed.dtype} {allowed.shape}"
            )
        return allowed

    def _slot_mask(self, allowed: np.ndarray | None) -> np.ndarray | None:
        """(T,) bool over the index's T slots: live, in this version, and ``allowed``;
        None where that is every slot (the index searches without a mask)."""
        if allowed is not None:
            allowed = self._checked(allowed)
        total = self.index.num_items
        if total == self.slots == self.num_items and self.all_live:
            return allowed  # slot i is row i, every one live
        mask = np.zeros(total, dtype=bool)
        mask[: self.slots] = self.live if allowed is None else self.live & allowed[self.slot_rows]
        return mask

    def _slot_exclude(self, exclude: sp.csr_matrix | None) -> sp.csr_matrix | None:
        """(B, T) CSR over the index's T slots: each excluded row's current slot."""
        if exclude is None:
            return None
        if not isinstance(exclude, sp.csr_matrix):
            exclude = sp.csr_matrix(exclude)
        if exclude.shape[1] != self.num_items:
            raise ValueError(
                f"exclude must have {self.num_items} columns (the item rows), got {exclude.shape}"
            )
        total = self.index.num_items
        if total == self.slots == self.num_items:
            return exclude
        slots = self.row_slots[exclude.indices]
        return sp.csr_matrix((exclude.data, slots, exclude.indptr), shape=(exclude.shape[0], total))

    def apply(self, update: ItemUpdate, where: str = "the update") -> Catalogue:
        """The next version: ``update``'s rows added or replaced (their vectors in new
        slots), then its ids blocked, unblocked and removed.

        The index grows in place (see the module's notes): only the latest version
        may apply, and no search may run during the call. A removed item's row that
        comes back in ``update.rows`` is live again (not blocked).

        Args:
            update: the change; its ids must be known where it acts on them.
            where: what to call the update in an error (its folder, for one read back).

        Raises:
            DataError: an id of ``blocked``/``unblocked``/``removed`` that the catalogue
                (with the update's rows) does not hold, or vectors that do not fit.
            ValueError: this catalogue is not the latest version of its index.
        """
        if self.index is not None and self.index.num_items != self.slots:
            raise ValueError(
                f"this catalogue knows {self.slots} slots, its index holds "
                f"{self.index.num_items}: only the latest version may apply an update"
            )
        count = update.rows.num_rows
        if update.vectors.shape != (count, self.item_vectors.shape[1]):
            raise DataError(
                f"{where}: {update.vectors.shape} vectors for {count} rows of width "
                f"{self.item_vectors.shape[1]}"
            )
        self._check_ids(update, where)  # before the index grows
        grown = self._with_rows(update) if count else self
        blocked, removed = grown.blocked.copy(), grown.removed.copy()
        blocked[grown.find(list(update.blocked))] = True
        blocked[grown.find(list(update.unblocked))] = False
        gone = grown.find(list(update.removed))
        removed[gone], blocked[gone] = True, False
        return dataclasses.replace(grown, blocked=blocked, removed=removed)

    def _check_ids(self, update: ItemUpdate, where: str) -> None:
        """Refuses an update whose blocked, unblocked or removed ids are neither held
        here (removed ones included) nor among its own rows."""
        own = KeyIndex(update.rows.column(self.key).combine_chunks())
        lists = (update.blocked, update.unblocked, update.removed)
        for ids, verb in zip(lists, ("blocks", "unblocks", "removes"), strict=True):
            ids = list(ids)
            missing = (self.find(ids) < 0) & (own.rows(self.as_keys(ids)) < 0)
            if missing.any():
                unknown = [i for i, m in zip(ids, missing.tolist(), strict=True) if m]
                raise DataError(
                    f"{where} {verb} item(s) the artifact does not hold: {unknown[:10]}"
                )

    def _with_rows(self, update: ItemUpdate) -> Catalogue:
        """This catalogue with ``update``'s rows added or replaced and their vectors in
        the next slots (the index grown); blocks and removals untouched, except that a
        removed row given again is back."""
        count, N = update.rows.num_rows, self.num_items
        rows = self.find(update.rows.column(self.key).to_pylist())  # (R,) -1: a new id
        new = rows < 0
        rows[new] = N + np.arange(int(new.sum()))
        fresh = np.arange(count, dtype=np.int64)  # the update's rows, after the N
        pick = np.arange(N + int(new.sum()), dtype=np.int64)
        pick[rows] = N + fresh
        items = pa.concat_tables([self.items, update.rows.cast(self.items.schema)]).take(pick)
        vectors = np.concatenate(
            [self.item_vectors, np.empty((int(new.sum()), self.item_vectors.shape[1]), np.float32)]
        )
        vectors[rows] = update.vectors
        row_slots = np.concatenate([self.row_slots, np.zeros(int(new.sum()), np.int64)])
        row_slots[rows] = self.slots + fresh
        index = None if self.index is None else self.index.growable()
        if index is not None:
            index.add(np.ascontiguousarray(update.vectors, dtype=np.float32))
        extra = np.zeros(int(new.sum()), dtype=bool)
        removed = np.concatenate([self.removed, extra])
        removed[rows] = False
        return dataclasses.replace(
            self,
            items=items.combine_chunks(),
            item_vectors=vectors,
            index=index,
            slots=self.slots + count,
            slot_rows=np.concatenate([self.slot_rows, rows]),
            row_slots=row_slots,
            blocked=np.concatenate([self.blocked, extra]),
            removed=removed,
        )


def _search(
    index: Index,
    queries: np.ndarray,
    k: int,
    exclude: sp.csr_matrix | None,
    allowed: np.ndarray | None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """``Index.search`` for (B, D) queries (no interests), ``search_interests`` for
    (B, K, D) ones."""
    if queries.ndim == 3:
        return index.search_interests(queries, k, exclude, allowed)
    ids, scores = index.search(queries, k, exclude, allowed)
    return ids, scores, None
