"""Operations endpoints: liveness, readiness, Prometheus metrics and artifact reloads."""

from __future__ import annotations

import hmac
import ipaddress
from typing import Annotated, Any

from fastapi import APIRouter, Header, HTTPException, Request, Response
from fastapi.responses import PlainTextResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from twotower.serving import schemas
from twotower.serving.state import Service

router = APIRouter()


@router.get("/health", response_model=schemas.HealthResponse)
async def health() -> schemas.HealthResponse:
    """Liveness: 200 while the process answers."""
    return schemas.HealthResponse(status="ok")


@router.get("/ready", response_model=schemas.ReadyResponse, responses={503: {}})
async def ready(state: Service, response: Response) -> schemas.ReadyResponse:
    """Readiness: 200 with the artifact served, 503 while shutting down."""
    artifact = state.retriever.artifact
    up = state.ready
    response.status_code = 200 if up else 503
    return schemas.ReadyResponse(
        status="ready" if up else "unavailable",
        artifact=artifact.fingerprint,
        items=artifact.index.num_items,
        index=artifact.index.kind,
        index_recall=(artifact.manifest.get("index_recall") or {}).get("recall"),
    )


@router.get("/metrics", response_class=PlainTextResponse)
async def prometheus(state: Service) -> PlainTextResponse:
    """Prometheus text format: requests, latency histogram, errors, batch sizes."""
    text = generate_latest(state.metrics.registry)
    return PlainTextResponse(text, media_type=CONTENT_TYPE_LATEST)


@router.post(
    "/admin/reload",
    response_model=schemas.ReloadResponse,
    responses={401: {}, 403: {}, 409: {"model": schemas.ErrorResponse}},
)
async def admin_reload(
    request: Request,
    state: Service,
    authorization: Annotated[str | None, Header(description="Bearer <token>")] = None,
) -> schemas.ReloadResponse:
    """Load the artifact folder again (e.g. after a new export) and serve it."""
    _authorize(state.config.admin_token, authorization, request.client)
    return await state.reload()


def _authorize(token: str | None, authorization: str | None, client: Any) -> None:
    """A configured token must be presented; without one, only loopback clients pass."""
    if token is None:
        host = getattr(client, "host", None)
        try:
            local = host is not None and ipaddress.ip_address(host).is_loopback
        except ValueError:
            local = False
        if not local:
            raise HTTPException(
                403, "admin endpoints answer only loopback clients unless an admin token is set"
            )
        return
    if authorization is None or not authorization.startswith("Bearer "):
        raise HTTPException(401, "admin endpoints need 'Authorization: Bearer <token>'")
    if not hmac.compare_digest(authorization[len("Bearer ") :].encode(), token.encode()):
        raise HTTPException(403, "wrong admin token")
