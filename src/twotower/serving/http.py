"""The HTTP recall service: a thin FastAPI layer over ``Retriever`` and ``MicroBatcher``.

    POST /recall                 one query: a known user, raw features or text
    POST /recall/batch           many queries, answered together
    GET  /items/{item_id}/similar  item-to-item by item vectors
    GET  /health, /ready         liveness; readiness (an artifact loaded, the worker up)
    GET  /metrics                Prometheus text: requests, latency, errors, batch sizes
    POST /admin/reload           load the artifact folder again and swap it in
    POST /admin/items            add, replace, block, unblock or remove items in place
    GET  /                       the retrieval explorer page (``serving/explorer.py``)
    GET  /explorer/info          the artifact's keys, sizes and item fields
    GET  /explorer/queries       known query ids by prefix (suggestions)
    GET  /explorer/queries/{query_id}  a user's state in the store: features, recent items
    POST /explorer/items         items' raw fields and their places on the map
    GET  /explorer/map           a sample of items on the corpus map

``create_app`` only assembles: one ``ServiceState`` (``state.py``: the artifact, the
micro-batcher, metrics, reloads, catalogue changes, users' states) and a router per
concern (``routes/recall.py``, ``routes/events.py``, ``routes/ops.py``,
``routes/items.py``, ``routes/explorer.py``) whose handlers reach that state through
``Depends`` and return the response model they declare; ``responses.py`` turns every
error into ``{"detail": "..."}``. ``POST /recall``, the hot path, is answered before
the routing when its body is plainly valid (``recall_path.py``: decoded, checked and
encoded in C by ``recall_codec.py``); any other body takes the route, which documents
it and writes the same 4xx as ever.

Requests never wait on each other's Python: handlers queue their queries on the
micro-batcher and await the answers, so concurrent requests share one tower pass
and one index search. A reload (the endpoint, or SIGHUP when enabled) swaps the
artifact without dropping a request; one that fails leaves the old artifact serving.

Every response to a bad request is a 4xx with ``{"detail": "..."}`` naming the field
or value at fault; nothing a client sends gives a 500.
"""

from __future__ import annotations

from importlib.metadata import version
from pathlib import Path

from fastapi import APIRouter, FastAPI
from fastapi.routing import APIRoute

from twotower.serving.middleware import BodyLimitMiddleware, MetricsMiddleware
from twotower.serving.recall_path import LeanRecall
from twotower.serving.responses import AsciiJSONResponse, add_error_handlers
from twotower.serving.routes import events, explorer, items, ops, recall
from twotower.serving.settings import ServiceConfig
from twotower.serving.state import ServiceState

__all__ = ["ServiceConfig", "create_app"]


def create_app(folder: Path, config: ServiceConfig | None = None) -> FastAPI:
    """The service for the artifact in ``folder``, loaded and verified now.

    Args:
        folder: the artifact folder; ``POST /admin/reload`` loads it again.
        config: how the service runs; the defaults when None.

    Returns:
        The app, its ``ServiceState`` at ``app.state.service``.

    Raises:
        DataError: the artifact is missing, corrupt or of another format version.
    """
    state = ServiceState(folder, config or ServiceConfig())
    app = FastAPI(
        title="twotower recall service",
        default_response_class=AsciiJSONResponse,  # JSON that echoes any text a client sent
        version=version("twotower"),
        description="Top-K candidate retrieval from an exported two-tower artifact.",
        lifespan=state.lifespan,
    )
    app.state.service = state
    add_error_handlers(app)
    for routes in (recall, events, ops, items, explorer):  # this order is the OpenAPI schema's
        app.include_router(routes.router)
    # the last added runs first: metrics, the body limit, then /recall's lean path
    app.add_middleware(LeanRecall, state=state, route=_route(recall.router, "/recall", "POST"))
    app.add_middleware(BodyLimitMiddleware, max_bytes=state.config.max_body_bytes)
    app.add_middleware(MetricsMiddleware, metrics=state.metrics)
    return app


def _route(router: APIRouter, path: str, method: str) -> APIRoute:
    """The router's route for ``method`` on ``path``."""
    return next(
        route
        for route in router.routes
        if isinstance(route, APIRoute) and route.path == path and method in route.methods
    )
