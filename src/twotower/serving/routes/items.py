"""Catalogue changes in place: items added, replaced, blocked, unblocked or removed."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Header, Request

from twotower.serving import schemas
from twotower.serving.auth import authorize
from twotower.serving.state import Service

router = APIRouter()


@router.post(
    "/admin/items",
    response_model=schemas.ItemChangesResponse,
    responses={
        401: {},
        403: {},
        409: {"model": schemas.ErrorResponse},
        422: {"model": schemas.ErrorResponse},
        503: {"model": schemas.ErrorResponse},
    },
)
async def admin_items(
    body: schemas.ItemChanges,
    request: Request,
    state: Service,
    authorization: Annotated[str | None, Header(description="Bearer <token>")] = None,
) -> schemas.ItemChangesResponse:
    """Add or replace items from raw rows (the item tower embeds them), block, unblock
    or remove items: the change is checked whole (a 422 names every row, column and id
    at fault), written as the artifact's next version, then served by every worker.
    The answer comes once it is served; a change answered survives a restart."""
    authorize([state.config.admin_token], authorization, request.client)
    return await state.change_items(body)
