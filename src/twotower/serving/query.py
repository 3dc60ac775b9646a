"""What one retrieval asks for and what it answers: ``Query``, ``Result`` and the
errors that name unknown ids.

A ``Query`` starts from exactly one source (a known user, a raw row, a text or an
item); ``Retriever.retrieve`` answers each with its ``Result`` or the ``DataError``
that query alone caused. The HTTP app turns requests into queries and results into
JSON (``dataclasses.asdict(result)``).

A query may carry the user's state itself: its recent interactions (``history``, with
``history_times``) and raw feature values (``features``). For a known user, what the
request gives wins over the stored state: its history replaces the stored recent
items (the stored ones are not added to it), its feature values replace the stored
ones column by column; the items a history names join the stored seen items. The
result's ``state`` says which the tower read.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from twotower.errors import DataError

SOURCES = ("user", "features", "text", "item")


@dataclasses.dataclass(frozen=True)
class Query:
    """One retrieval, from exactly one of a known user, a raw row (or a history), a
    text or an item.

    Attributes:
        user: a query key; its state (feature values, recent and seen items) comes
            from the user-state store. With ``features`` or ``history`` too, those
            win over the stored ones (the module doc says how), and a user the store
            does not know is served from them alone.
        features: raw query-side feature values ``{column: value}``, e.g. of a user
            the artifact does not know (cold start); columns left out are missing.
        text: free text for the query side's text features (search).
        item: an item key: the items nearest to its vector (the item itself excluded).
        history: the query's recent interactions as item keys, in the order they
            happened (oldest first): the history features read them, and they count
            as seen. Alone, or with ``user``, ``features`` or ``text``.
        history_times: their timestamps, in the interaction log's units (needed by a
            history feature with ``time_buckets``); ordered by them, of equal ones the
            later given counts as later.
        k: how many items to return (>= 1; above the corpus size, the whole corpus).
        exclude_seen: leave out the items the user interacted with (stored, and the
            ``history``).
        exclude_items: item keys left out of this query's result.
        filter: only items whose columns of the item table satisfy it, e.g.
            ``{"category": {"in": ["toys"]}, "price": {"lt": 20}}``
            (``twotower.serving.filters`` gives the syntax); None: every item.
    """

    user: Any = None
    features: Mapping[str, Any] | None = None
    text: str | None = None
    item: Any = None
    history: Sequence[Any] | None = None
    history_times: Sequence[float] | None = None
    k: int = 10
    exclude_seen: bool = True
    exclude_items: Sequence[Any] = ()
    filter: Mapping[str, Mapping[str, Any]] | None = None

    @property
    def source(self) -> str:
        """Which of ``user``, ``features``, ``text``, ``item`` this query starts from
        (a history alone is a ``features`` query without feature values)."""
        given = [name for name in SOURCES if getattr(self, name) is not None]
        if given == ["user", "features"]:
            return "user"
        if not given and self.history is not None:
            return "features"
        if len(given) != 1:
            raise DataError(
                f"a query needs exactly one of {', '.join(SOURCES)}; got "
                f"{', '.join(given) if given else 'none'}"
            )
        if given == ["item"] and self.history is not None:
            raise DataError("an item query takes no history; give the history with a user")
        return given[0]


@dataclasses.dataclass(frozen=True)
class Result:
    """One query's items, best first.

    Attributes:
        query: the user id, the text, the item id, or for a raw row its query key
            (``retrieve``: None when it has none; ``recall_rows``: its position).
        items: item ids as in the item table's key column (int or str).
        scores: their scores (cosines), same order.
        interests: for a multi-interest query tower, which of the query's interest
            vectors (0..K-1) found each item, same order; None otherwise.
        vector: where the query vector came from: ``tower`` (computed now),
            ``precomputed`` (a known user's row of the query vectors file) or ``item``
            (an item's own vector).
        state: for a query through the tower, what it read of the user's state:
            ``{"features": ..., "history": ...}``, each ``stored`` (the store's),
            ``request`` (the query's own), ``stored+request`` (features: the stored
            values, some replaced by the query's) or ``none``.
    """

    query: Any
    items: list[Any]
    scores: list[float]
    interests: list[int] | None = None
    vector: str = "tower"
    state: dict[str, str] | None = None


class UnknownQueryError(DataError):
    """Query (user) ids that the artifact does not know; ``ids`` lists them."""

    def __init__(self, ids: Sequence[Any]) -> None:
        self.ids = list(ids)
        shown = ", ".join(repr(i) for i in self.ids[:10])
        more = f" and {len(self.ids) - 10} more" if len(self.ids) > 10 else ""
        super().__init__(
            f"unknown query id(s): {shown}{more}; recall a new user by its feature rows instead"
        )


class UnknownItemError(DataError):
    """Item ids that are not in the artifact's item table; ``ids`` lists them."""

    def __init__(self, ids: Sequence[Any]) -> None:
        self.ids = list(ids)
        super().__init__(f"unknown item id(s): {', '.join(repr(i) for i in self.ids[:10])}")


def check_k(k: Any) -> None:
    """Refuses a ``k`` that is not an integer >= 1 (a bool is not one).

    Raises:
        DataError: naming the value.
    """
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise DataError(f"k must be an integer >= 1, got {k!r}")
