"""Operations endpoints: liveness, readiness, Prometheus metrics and artifact reloads."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Header, Request, Response
from fastapi.responses import PlainTextResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from twotower.serving import schemas
from twotower.serving.auth import authorize
from twotower.serving.state import Service, answered_by

router = APIRouter()


@router.get("/health", response_model=schemas.HealthResponse)
async def health() -> schemas.HealthResponse:
    """Liveness: 200 while the process answers."""
    return schemas.HealthResponse(status="ok")


@router.get("/ready", response_model=schemas.ReadyResponse, responses={503: {}})
async def ready(state: Service, response: Response) -> schemas.ReadyResponse:
    """Readiness: 200 with the artifact served; 503 while shutting down or while the
    users' state store does not answer (the service recovers when it does again)."""
    artifact = state.retriever.artifact
    problem = None if state.ready else "the service is shutting down"
    problem = problem or await state.store_problem()
    response.status_code = 200 if problem is None else 503
    return schemas.ReadyResponse(
        status="ready" if problem is None else "unavailable",
        store=state.retriever.store.name,
        problem=problem,
        **answered_by(artifact),
        items=int(artifact.catalogue.known.sum()),  # blocked ones included, removed not
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
    authorize([state.config.admin_token], authorization, request.client)
    return await state.reload()
