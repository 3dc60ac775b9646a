"""Retrieval endpoints: one query, a batch of queries, and an item's neighbours."""

from __future__ import annotations

import dataclasses
from typing import Annotated

from fastapi import APIRouter, Query
from fastapi import Path as PathParam

from twotower.errors import DataError
from twotower.serving import schemas
from twotower.serving.artifact import Artifact
from twotower.serving.query import Query as RetrievalQuery
from twotower.serving.query import Result
from twotower.serving.responses import ERRORS, refusal, status_of
from twotower.serving.state import Service, answered_by

router = APIRouter()


@router.post("/recall", response_model=schemas.RecallResponse, responses=ERRORS)
async def recall(body: schemas.RecallRequest, state: Service) -> schemas.RecallResponse:
    """The top k items for one query: a known user, raw features (cold start) or text."""
    (result,), artifact = await state.answer([body.query()])
    return _response(result, artifact)


@router.post("/recall/batch", response_model=schemas.BatchResponse, responses=ERRORS)
async def recall_batch(body: schemas.BatchRequest, state: Service) -> schemas.BatchResponse:
    """Many queries at once; a query that fails gets its own error and status."""
    results, artifact = await state.answer([q.query() for q in body.queries])
    return schemas.BatchResponse(**answered_by(artifact), results=[_entry(r) for r in results])


@router.get("/items/{item_id}/similar", response_model=schemas.RecallResponse, responses=ERRORS)
async def similar(
    item_id: Annotated[str, PathParam(description="An item id, matched by value.")],
    state: Service,
    k: Annotated[int, Query(ge=1, le=schemas.MAX_K, description="How many items.")] = 10,
) -> schemas.RecallResponse:
    """The k items whose vectors are closest to this item's (the item itself left out)."""
    (result,), artifact = await state.answer([RetrievalQuery(item=item_id, k=k)])
    return _response(result, artifact)


def _response(answer: Result | DataError, artifact: Artifact) -> schemas.RecallResponse:
    """One query's answer, or the HTTP error its failure calls for."""
    if isinstance(answer, DataError):
        raise refusal(answer)
    return schemas.RecallResponse(**answered_by(artifact), **dataclasses.asdict(answer))


def _entry(answer: Result | DataError) -> schemas.BatchResult:
    """One query's answer in a batch: its items, or its error and status."""
    if isinstance(answer, DataError):
        return schemas.BatchResult(error=str(answer), status=status_of(answer))
    return schemas.BatchResult(**dataclasses.asdict(answer))
