"""``POST /recall``'s body decoded and its answer encoded in C (msgspec), for the lean path.

``RecallBody`` mirrors ``schemas.RecallRequest`` field for field, with the same types
taken as strictly (an integer is never a string, a boolean never an integer), the same
bounds and unknown fields refused. It decides only whether a body is plainly valid:
``decode`` returns None for anything else (a body that is not JSON, breaks a type or a
bound, or names no single source), and the request then takes the framework's path,
whose pydantic model writes the 422 naming the field at fault. So a body this decoder
takes is one the pydantic model takes too, as the same ``Query`` (tested, also on
generated bodies), and every bad request is answered exactly as before.

``encode_answer`` writes ``schemas.RecallResponse``'s JSON, its fields in the model's
order; like the framework's responses, only ASCII (any other text is escaped).
"""

from __future__ import annotations

import json
from typing import Annotated, Any

import msgspec

from twotower.serving import schemas
from twotower.serving.query import Query, Result

Id = int | str
FilterValue = int | float | str | bool
Bound = int | float
Scalar = int | float | str | bool | None
FeatureValue = Scalar | list[Scalar]


def _most(n: int) -> msgspec.Meta:
    return msgspec.Meta(max_length=n)


class ConditionBody(msgspec.Struct, forbid_unknown_fields=True):
    """``schemas.Condition``: what one item column must satisfy."""

    in_: Annotated[list[FilterValue], _most(schemas.MAX_FILTER_VALUES)] | None = msgspec.field(
        default=None, name="in"
    )
    not_in: Annotated[list[FilterValue], _most(schemas.MAX_FILTER_VALUES)] | None = None
    gt: Bound | None = None
    gte: Bound | None = None
    lt: Bound | None = None
    lte: Bound | None = None

    def condition(self) -> dict[str, Any]:
        """The operators given, as ``schemas.Condition.condition`` writes them."""
        given = (("in", self.in_), ("not_in", self.not_in), ("gt", self.gt))
        given += (("gte", self.gte), ("lt", self.lt), ("lte", self.lte))
        return {name: value for name, value in given if value is not None}


class RecallBody(msgspec.Struct, forbid_unknown_fields=True):
    """``schemas.RecallRequest``, decoded and checked in C."""

    user_id: Id | None = None
    features: Annotated[dict[str, FeatureValue], _most(schemas.MAX_FEATURES)] | None = None
    history: Annotated[list[Id], _most(schemas.MAX_HISTORY)] | None = None
    history_times: Annotated[list[int | float], _most(schemas.MAX_HISTORY)] | None = None
    text: Annotated[str, _most(schemas.MAX_TEXT)] | None = None
    k: Annotated[int, msgspec.Meta(ge=1, le=schemas.MAX_K)] = 10
    exclude_seen: bool = True
    exclude_items: Annotated[list[Id], _most(schemas.MAX_EXCLUDE)] = msgspec.field(
        default_factory=list
    )
    filter: Annotated[dict[str, ConditionBody], _most(schemas.MAX_FILTER_COLUMNS)] | None = None

    def query(self) -> Query:
        """The retriever's query, as ``schemas.RecallRequest.query`` builds it."""
        return schemas.recall_query(self)


_decoder = msgspec.json.Decoder(RecallBody)
_encoder = msgspec.json.Encoder()


def decode(body: bytes) -> Query | None:
    """The query of a plainly valid ``/recall`` body; None for any other body (the
    framework's path then answers it, with the 422 its model writes)."""
    try:
        request = _decoder.decode(body)
    except msgspec.DecodeError:  # ValidationError is one
        return None
    if schemas.source_problem(request.user_id, request.features, request.text, request.history):
        return None
    return request.query()


def encode_answer(result: Result, artifact: str, version: int) -> bytes:
    """``schemas.RecallResponse``'s JSON for one result of the artifact ``artifact``
    (its fingerprint) at ``version``."""
    payload = {
        "artifact": artifact,
        "version": version,
        "query": result.query,
        "items": result.items,
        "scores": result.scores,
        "interests": result.interests,
        "vector": result.vector,
        "state": result.state,
    }
    return encode(payload)


def encode(payload: Any) -> bytes:
    """``payload`` as compact JSON in ASCII: msgspec's, or where it holds other text
    (or text UTF-8 cannot carry, such as a lone surrogate a client sent), escaped by
    the standard library as the framework's responses are."""
    try:
        encoded = _encoder.encode(payload)
    except (msgspec.EncodeError, UnicodeEncodeError, TypeError):
        encoded = b"\x80"  # not ASCII: written below
    if encoded.isascii():
        return encoded
    return json.dumps(payload, separators=(",", ":")).encode("ascii")
