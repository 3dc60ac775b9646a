"""Explorer endpoints: the page at ``/`` and the rows it shows (``serving/explorer.py``)."""

from __future__ import annotations

import asyncio
from typing import Annotated

from fastapi import APIRouter, Query
from fastapi import Path as PathParam
from fastapi.responses import HTMLResponse

from twotower.errors import DataError
from twotower.serving import explorer, schemas
from twotower.serving.responses import ERRORS, refusal
from twotower.serving.state import Service, answered_by

router = APIRouter()

# The page loads nothing from elsewhere; its script and styles are inline.
PAGE_POLICY = (
    "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
    "connect-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none'"
)


@router.get("/", response_class=HTMLResponse, include_in_schema=False)
async def explorer_page() -> HTMLResponse:
    """The retrieval explorer: a user's history and results, text search, neighbours."""
    return HTMLResponse(explorer.page(), headers={"Content-Security-Policy": PAGE_POLICY})


@router.get("/explorer/info", response_model=schemas.ExplorerInfo)
async def explorer_info(state: Service) -> schemas.ExplorerInfo:
    """The artifact's keys, sizes, item fields and whether text search applies."""
    artifact = state.retriever.artifact
    return schemas.ExplorerInfo(**{**explorer.info(artifact), **answered_by(artifact)})


@router.get("/explorer/queries", response_model=schemas.Suggestions)
async def explorer_suggest(
    state: Service,
    prefix: Annotated[str, Query(max_length=200, description="The id's beginning.")] = "",
    limit: Annotated[
        int, Query(ge=1, le=explorer.MAX_SUGGESTIONS, description="How many ids at most.")
    ] = 10,
) -> schemas.Suggestions:
    """Known query ids starting with ``prefix`` (for suggestions as one types)."""
    artifact = state.retriever.artifact
    ids = await asyncio.to_thread(explorer.suggest, artifact, prefix, limit)
    return schemas.Suggestions(**answered_by(artifact), ids=ids)


@router.get(
    "/explorer/queries/{query_id}",
    response_model=schemas.QueryRecord,
    responses={**ERRORS, 503: {"model": schemas.ErrorResponse}},
)
async def explorer_query(
    query_id: Annotated[str, PathParam(description="A query id, matched by value.")],
    state: Service,
) -> schemas.QueryRecord:
    """A user's state in the store: its raw features and recent items, with the items'
    fields (404: a user the store does not know; 503: the store does not answer)."""
    retriever = state.retriever  # one artifact and its store, whatever a reload does meanwhile
    try:
        record = await asyncio.to_thread(
            explorer.query_record, retriever.artifact, retriever.store, query_id
        )
    except DataError as err:
        raise refusal(err) from None
    return schemas.QueryRecord(**answered_by(retriever.artifact), **record)


@router.post("/explorer/items", response_model=schemas.ItemRecords, responses=ERRORS)
async def explorer_items(body: schemas.ItemsRequest, state: Service) -> schemas.ItemRecords:
    """Items' raw fields (title, genres, ...), in the order asked."""
    artifact = state.retriever.artifact
    try:
        found = await asyncio.to_thread(explorer.items_on_map, artifact, body.ids)
    except DataError as err:
        raise refusal(err) from None
    return schemas.ItemRecords(**answered_by(artifact), **found)


@router.get("/explorer/map", response_model=schemas.CorpusMap)
async def explorer_map(
    state: Service,
    limit: Annotated[
        int, Query(ge=1, le=explorer.MAX_MAP_POINTS, description="How many items at most.")
    ] = 2000,
) -> schemas.CorpusMap:
    """Items on the first two principal components of the item vectors (a sample)."""
    artifact = state.retriever.artifact
    found = await asyncio.to_thread(explorer.corpus_map, artifact, limit)
    return schemas.CorpusMap(**answered_by(artifact), **found)
