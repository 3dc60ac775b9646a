"""The HTTP service's request and response bodies: validated, bounded, documented.

Every field has a description, so the OpenAPI schema at ``/openapi.json`` (and the
pages at ``/docs``) say what each one means. Requests forbid unknown fields and take
JSON types strictly: ``"k": "10"`` or ``"exclude_seen": 1`` is a 422, not a guess.
"""

from __future__ import annotations

import math
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictFloat,
    StrictInt,
    StrictStr,
    model_validator,
)

from twotower.serving.query import Query

MAX_K = 1000
MAX_BATCH = 1000
MAX_EXCLUDE = 10_000
MAX_TEXT = 10_000
MAX_FEATURES = 256
MAX_HISTORY = 1000
MAX_EVENTS = 10_000
MAX_ITEM_CHANGES = 10_000
MAX_FILTER_COLUMNS = 64
MAX_FILTER_VALUES = 10_000

Id = StrictInt | StrictStr
VERSION = (
    "The version of that artifact: one more with each change of its catalogue in place "
    "(POST /admin/items, twotower export --update)."
)
# An item id in an answer is the artifact's key as stored: integers and text, or, for a
# corpus keyed by numbers with a fraction, floats.
KeyValue = StrictInt | StrictStr | StrictFloat
Scalar = StrictInt | StrictFloat | StrictStr | StrictBool | None
VectorSource = Literal["tower", "precomputed", "item"]
FeatureValue = Scalar | list[Scalar]


class StateUsed(BaseModel):
    """What a query through the tower read of the user's state."""

    features: Literal["stored", "request", "stored+request", "none"] = Field(
        description="Feature values: the store's, the request's, the store's with some "
        "replaced by the request's, or none (all missing)."
    )
    history: Literal["stored", "request", "none"] = Field(
        description="Recent items: the store's, the request's (which replaces the "
        "store's), or none."
    )


FilterValue = StrictInt | StrictFloat | StrictStr | StrictBool
Bound = StrictInt | StrictFloat


class Condition(BaseModel):
    """What one item column must satisfy; every condition given holds (AND). A null
    value never satisfies one."""

    model_config = ConfigDict(extra="forbid")

    in_: list[FilterValue] | None = Field(
        None,
        alias="in",
        max_length=MAX_FILTER_VALUES,
        description="The value is one of these (of a list column: any element is).",
    )
    not_in: list[FilterValue] | None = Field(
        None,
        max_length=MAX_FILTER_VALUES,
        description="The value is none of these (of a list column: no element is).",
    )
    gt: Bound | None = Field(None, description="The value is above this (numeric columns).")
    gte: Bound | None = Field(None, description="The value is at least this.")
    lt: Bound | None = Field(None, description="The value is below this.")
    lte: Bound | None = Field(None, description="The value is at most this.")

    def condition(self) -> dict[str, Any]:
        """The condition as the retriever's filter takes it: the operators given."""
        return self.model_dump(by_alias=True, exclude_none=True)


class RecallRequest(BaseModel):
    """One query: one of ``user_id``, ``features``, ``text`` (a user's ``features`` may
    go with its ``user_id``), or a ``history`` alone."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {"user_id": 17, "k": 10},
                {"features": {"age": 31, "segment": "b"}, "k": 20},
                {"history": [50, 181, 172], "history_times": [884e6, 885e6, 886e6]},
                {"user_id": 17, "history": [50, 181]},
                {"text": "red running shoes", "k": 10, "exclude_items": [12, 40]},
                {"user_id": 17, "filter": {"category": {"in": ["c1", "c3"]}, "price": {"lt": 20}}},
            ]
        },
    )

    user_id: Id | None = Field(
        None,
        description="A user (query) id. Its state in the user-state store (feature values, "
        "recent and seen items; the artifact's, as events changed it) feeds the query "
        "tower. With features or history, those replace the stored ones; a user the "
        "store does not know is then served from them alone (else a 404).",
    )
    features: dict[str, FeatureValue] | None = Field(
        None,
        max_length=MAX_FEATURES,
        description="Raw query-side feature values by column name: a user the artifact "
        "does not know (cold start), or with user_id, values replacing the stored ones. "
        "A column left out is missing (or stored); a name the query side does not read "
        "is a 422.",
    )
    history: list[Id] | None = Field(
        None,
        max_length=MAX_HISTORY,
        description="The query's recent interactions, item ids in the order they happened "
        "(oldest first). The history features read them (replacing a known user's stored "
        "recent items) and they count as seen. An unknown item id is a 404.",
    )
    history_times: list[StrictInt | StrictFloat] | None = Field(
        None,
        max_length=MAX_HISTORY,
        description="Their timestamps, one per history item, in the interaction log's "
        "units; required where a history feature reads time gaps.",
    )
    text: str | None = Field(
        None,
        max_length=MAX_TEXT,
        description="Query text, for artifacts whose query side has a text feature (search).",
    )
    k: StrictInt = Field(
        10,
        ge=1,
        le=MAX_K,
        description=f"How many items to return, 1 to {MAX_K}; above the corpus size, "
        "the whole corpus.",
    )
    exclude_seen: StrictBool = Field(
        True, description="Leave out the items a known user already interacted with."
    )
    exclude_items: list[Id] = Field(
        default_factory=list,
        max_length=MAX_EXCLUDE,
        description="Item ids never to return for this query; unknown ids are ignored.",
    )
    filter: dict[str, Condition] | None = Field(
        None,
        max_length=MAX_FILTER_COLUMNS,
        description="Only items whose columns in the item table satisfy every condition, "
        'e.g. {"category": {"in": ["toys", "games"]}, "price": {"gte": 5, "lt": 20}}: '
        "in / not_in on text, integer, number or boolean columns (and lists of them: "
        "any element), gt / gte / lt / lte on numeric ones. A null value matches no "
        "condition. Applied inside the search. A column that is not filterable, a "
        "value of the wrong kind or an empty filter is a 422.",
        examples=[{"category": {"in": ["c1", "c3"]}, "price": {"lt": 20}}],
    )

    @model_validator(mode="after")
    def _one_source(self) -> RecallRequest:
        problem = source_problem(self.user_id, self.features, self.text, self.history)
        if problem is not None:
            raise ValueError(problem)
        return self

    def query(self) -> Query:
        """The retriever's query for this request."""
        return recall_query(self)


def recall_query(request: Any) -> Query:
    """The retriever's query for a recall request's fields: a ``RecallRequest``'s, or
    the lean path's ``recall_codec.RecallBody``'s (its conditions with ``condition()``)."""
    conditions = request.filter
    return Query(
        user=request.user_id,
        features=request.features,
        text=request.text,
        history=request.history,
        history_times=request.history_times,
        k=request.k,
        exclude_seen=request.exclude_seen,
        exclude_items=tuple(request.exclude_items),
        filter=None
        if conditions is None
        else {column: c.condition() for column, c in conditions.items()},
    )


def source_problem(user_id: Any, features: Any, text: Any, history: Any) -> str | None:
    """Why a recall request does not name one source (a ``user_id``, ``features``, a
    ``text``, a ``history`` alone; ``features`` may go with a ``user_id``); None when
    it does."""
    named = {"user_id": user_id, "features": features, "text": text}
    given = [name for name, value in named.items() if value is not None]
    if given == ["user_id", "features"] or (not given and history is not None):
        return None
    if len(given) != 1:
        return (
            "give one of user_id, features, text or history (features may go with "
            f"user_id), got {' and '.join(given) if given else 'none'}"
        )
    return None


class EventIn(BaseModel):
    """One interaction to append to a user's state."""

    model_config = ConfigDict(extra="forbid")

    user: Id = Field(description="The user's id; a user the store does not know starts here.")
    item: Id = Field(description="The item's id, matched by value; an unknown one is refused.")
    timestamp: StrictInt | StrictFloat | None = Field(
        None,
        description="When it happened, in the interaction log's units; default: the "
        "service's clock in Unix seconds.",
    )

    @model_validator(mode="after")
    def _finite(self) -> EventIn:
        if self.timestamp is not None and not math.isfinite(self.timestamp):
            raise ValueError("timestamp must be a finite number")
        return self


class EventsRequest(BaseModel):
    """Interactions to append to their users' states, in the order they happened."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [{"events": [{"user": 17, "item": 50, "timestamp": 893286638}]}]
        },
    )

    events: list[EventIn] = Field(
        min_length=1,
        max_length=MAX_EVENTS,
        description=f"1 to {MAX_EVENTS} events; each user's in the order they happened.",
    )


class RefusedEvent(BaseModel):
    """An event that was not stored, and why."""

    index: int = Field(description="Its position in the request's events.")
    error: str = Field(description="Why, naming the value at fault.")


class EventsResponse(BaseModel):
    """What a batch of events did: the others were stored, each user's atomically."""

    artifact: str = Field(description="The fingerprint of the artifact that checked them.")
    version: int = Field(description=VERSION)
    stored: int = Field(description="How many events were stored.")
    refused: list[RefusedEvent] = Field(description="Each event refused, and why.")


ItemRow = Annotated[dict[str, FeatureValue], Field(max_length=MAX_FEATURES)]


class ItemChanges(BaseModel):
    """A change of the catalogue: items added or replaced from raw rows, items blocked,
    unblocked or removed. Written as the artifact's next version, then served."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "upsert": [
                        {
                            "item_id": 5001,
                            "category": "c3",
                            "price": 12.5,
                            "views": 0,
                            "genres": "g04|g11",
                            "title": "kazoo quartet",
                        }
                    ],
                    "block": [17],
                    "remove": [93],
                }
            ]
        },
    )

    upsert: list[ItemRow] = Field(
        default_factory=list,
        max_length=MAX_ITEM_CHANGES,
        description="Items to add (a new id) or replace (a known id), as raw rows of the "
        "item table: the item key and every column the item features read (null for a "
        "missing value); the table's other columns may be left out. The item tower embeds "
        "them. A replaced item keeps its block.",
    )
    block: list[Id] = Field(
        default_factory=list,
        max_length=MAX_ITEM_CHANGES,
        description="Item ids never to return (kept in the artifact, e.g. out of stock); "
        "an id added in the same change may be blocked.",
    )
    unblock: list[Id] = Field(
        default_factory=list,
        max_length=MAX_ITEM_CHANGES,
        description="Blocked item ids to return again.",
    )
    remove: list[Id] = Field(
        default_factory=list,
        max_length=MAX_ITEM_CHANGES,
        description="Item ids to remove: never returned, and unknown from then on.",
    )

    @model_validator(mode="after")
    def _bounded(self) -> ItemChanges:
        total = len(self.upsert) + len(self.block) + len(self.unblock) + len(self.remove)
        if total == 0:
            raise ValueError("give at least one item to upsert, block, unblock or remove")
        if total > MAX_ITEM_CHANGES:
            raise ValueError(f"{total} items in one change; at most {MAX_ITEM_CHANGES}")
        return self


class ItemChangesResponse(BaseModel):
    """The catalogue's new version, served: what it changed and how long it took."""

    artifact: str = Field(
        description="The fingerprint of the version that holds the change, served by now "
        "(or of the version served, for a change that changes nothing)."
    )
    version: int = Field(description="That version. " + VERSION)
    previous: str = Field(description="The fingerprint of the version it replaced.")
    added: int = Field(description="Items added (new ids).")
    replaced: int = Field(description="Items replaced (known ids given new rows).")
    blocked: int = Field(description="Items blocked.")
    unblocked: int = Field(description="Items unblocked.")
    removed: int = Field(description="Items removed.")
    seconds: float = Field(
        description="From the change's arrival to it being served: checking, embedding, "
        "writing the version and applying it."
    )


class BatchRequest(BaseModel):
    """Many queries in one request, answered together."""

    model_config = ConfigDict(extra="forbid")

    queries: list[RecallRequest] = Field(
        min_length=1,
        max_length=MAX_BATCH,
        description=f"1 to {MAX_BATCH} queries, each as the body of POST /recall.",
    )


class Answered(BaseModel):
    """Which artifact an answer came from (the fields every answer of it starts with)."""

    artifact: str = Field(description="The fingerprint of the artifact that answered.")
    version: int = Field(description=VERSION)


class RecallResponse(Answered):
    """The top items of one query, best first."""

    query: Any = Field(
        description="The user id, the text, the item id, or a feature row's user key (null "
        "when the row has none)."
    )
    items: list[KeyValue] = Field(description="Item ids, best first.")
    scores: list[float] = Field(description="Their cosine similarities to the query.")
    interests: list[int] | None = Field(
        None,
        description="For a multi-interest model, which of the query's interest vectors "
        "(0 to K-1) found each item, same order; null otherwise (and for item queries).",
    )
    vector: VectorSource = Field(
        "tower",
        description="Where the query vector came from: tower (computed for this request), "
        "precomputed (the user's row of the query vectors file the service was started "
        "with) or item (the item's own vector).",
    )
    state: StateUsed | None = Field(
        None,
        description="For a query through the tower, what it read of the user's state "
        "(null for an item's neighbours).",
    )


class BatchResult(BaseModel):
    """One query's answer in a batch: items and scores, or an error."""

    query: Any = Field(None, description="As in RecallResponse.")
    items: list[KeyValue] = Field(default_factory=list, description="Item ids, best first.")
    scores: list[float] = Field(default_factory=list, description="Their cosine similarities.")
    interests: list[int] | None = Field(None, description="As in RecallResponse.")
    vector: VectorSource | None = Field(None, description="As in RecallResponse.")
    state: StateUsed | None = Field(None, description="As in RecallResponse.")
    error: str | None = Field(None, description="Why this query has no answer, if it has none.")
    status: int = Field(200, description="The status a POST /recall of this query gets.")


class BatchResponse(Answered):
    """Answers to a batch, in the order of its queries."""

    results: list[BatchResult] = Field(description="One per query, in order.")


class ErrorResponse(BaseModel):
    """What was wrong with a request."""

    detail: str = Field(description="A message naming the field or value at fault.")
    errors: list[dict[str, Any]] | None = Field(
        None, description="For a 422: each validation error (location, message, input)."
    )


class HealthResponse(BaseModel):
    """Liveness: the process answers."""

    status: str = Field(description='"ok".')


class ReadyResponse(BaseModel):
    """Readiness: an artifact is loaded, the batch worker runs, the state store answers."""

    status: str = Field(description='"ready", or "unavailable" with status 503.')
    store: str = Field(description='Where users\' states live: "memory" or the Redis URL.')
    problem: str | None = Field(None, description="Why the service is not ready, if it is not.")
    artifact: str = Field(description="The fingerprint of the artifact being served.")
    version: int = Field(description=VERSION)
    items: int = Field(description="Items in its corpus (blocked ones included, removed ones not).")
    index: str = Field(description="Its index kind.")
    index_recall: float | None = Field(
        None, description="The index's recall@10 against exact search, measured at export."
    )


class ReloadResponse(BaseModel):
    """The artifact now served after a reload."""

    artifact: str = Field(description="The fingerprint of the artifact now served.")
    version: int = Field(description=VERSION)
    previous: str = Field(description="The fingerprint of the one it replaced.")
    seconds: float = Field(description="How long loading and verifying it took.")


class ExplorerInfo(BaseModel):
    """What the explorer page needs before its first lookup."""

    artifact: str = Field(description="The fingerprint of the artifact served.")
    version: int = Field(description=VERSION)
    query_key: str = Field(description="The query table's key column.")
    item_key: str = Field(description="The item table's key column.")
    items: int = Field(description="Items in the corpus.")
    queries: int = Field(description="Known queries (users) the artifact holds, loaded.")
    users: bool = Field(
        description="Whether the artifact's users are loaded (suggestions come from them); "
        "false where users' states live in an online store (any user id may be typed)."
    )
    text_search: bool = Field(description="Whether the query side reads text.")
    heldout: bool = Field(description="Whether the artifact carries the split's test items.")
    item_fields: list[str] = Field(description="The item table's other columns.")


class Suggestions(Answered):
    """Known query ids that start with a prefix."""

    ids: list[Any] = Field(description="Query ids, in table order.")


class ItemRecords(Answered):
    """Items' raw fields."""

    items: list[dict[str, Any]] = Field(description="One row per id asked, in that order.")
    points: list[list[float]] = Field(description="Their (x, y) on the corpus map.")


class CorpusMap(Answered):
    """Items on the first two principal components of the item vectors."""

    ids: list[Any] = Field(description="Item ids, strided over the corpus.")
    points: list[list[float]] = Field(description="Their (x, y), within [-1, 1].")


class QueryRecord(Answered):
    """A user's state in the user-state store: its raw features and its recent items."""

    id: Any = Field(description="The query id.")
    features: dict[str, Any] = Field(description="Its stored raw feature values.")
    history: list[dict[str, Any]] = Field(
        description="Its recent items (their rows), most recent first, at most 50."
    )
    history_kind: str = Field(description="Where the history comes from.")
    history_total: int = Field(description="How many items the whole history holds.")
    heldout: list[Any] = Field(
        description="Its test items under the run's split (none where the artifact does "
        "not hold the user)."
    )
    before_heldout: list[Any] = Field(
        description="The items it interacted with besides those (at most 10,000)."
    )


class ItemsRequest(BaseModel):
    """Item ids to look up."""

    model_config = ConfigDict(extra="forbid")

    ids: list[Id] = Field(min_length=1, max_length=MAX_K, description=f"1 to {MAX_K} item ids.")
