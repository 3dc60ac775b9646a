"""Events: interactions appended to their users' states as they happen."""

from __future__ import annotations

import time
from typing import Annotated

from fastapi import APIRouter, Header, Request

from twotower.serving import schemas
from twotower.serving.auth import authorize
from twotower.serving.state import Service, answered_by
from twotower.serving.stores import Event

router = APIRouter()


@router.post(
    "/events",
    response_model=schemas.EventsResponse,
    responses={401: {}, 403: {}, 409: {}, 503: {"model": schemas.ErrorResponse}},
)
async def events(
    body: schemas.EventsRequest,
    request: Request,
    state: Service,
    authorization: Annotated[str | None, Header(description="Bearer <token>")] = None,
) -> schemas.EventsResponse:
    """Append interactions to their users' recent and seen items (each user's at once);
    the next recall reads them. An event naming an unknown item is refused by name, the
    others stored. Needs the ingest or the admin token (without either, loopback only)."""
    config = state.config
    authorize([config.ingest_token, config.admin_token], authorization, request.client)
    now = time.time()
    batch = [
        Event(e.user, e.item, float(now if e.timestamp is None else e.timestamp))
        for e in body.events
    ]
    stored, refused, artifact = await state.ingest(batch)
    return schemas.EventsResponse(
        **answered_by(artifact),
        stored=stored,
        refused=[schemas.RefusedEvent(index=i, error=why) for i, why in refused],
    )
