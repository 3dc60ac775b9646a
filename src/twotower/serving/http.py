"""The HTTP recall service: a thin FastAPI layer over ``Retriever`` and ``MicroBatcher``.

    POST /recall                 one query: a known user, raw features or text
    POST /recall/batch           many queries, answered together
    GET  /items/{item_id}/similar  item-to-item by item vectors
    GET  /health, /ready         liveness; readiness (an artifact loaded, the worker up)
    GET  /metrics                Prometheus text: requests, latency, errors, batch sizes
    POST /admin/reload           load the artifact folder again and swap it in
    GET  /                       the retrieval explorer page (``serving/explorer.py``)
    GET  /explorer/...           the rows it shows: query features and history, items

Requests never wait on each other's Python: handlers queue their queries on the
micro-batcher and await the answers, so concurrent requests share one tower pass
and one index search. A reload (the endpoint, or SIGHUP when enabled) loads and
verifies the new artifact beside the old one and swaps a single reference: batches
in flight finish on the old artifact, the next ones use the new one, and no
request is dropped. A reload that fails leaves the old artifact serving.

Every response to a bad request is a 4xx with ``{"detail": "..."}`` naming the field
or value at fault; nothing a client sends gives a 500.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hmac
import ipaddress
import json
import logging
import signal
import time
from importlib.metadata import version
from pathlib import Path
from typing import Annotated, Any

from fastapi import FastAPI, Header, HTTPException, Query, Request
from fastapi import Path as PathParam
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

from twotower.errors import DataError
from twotower.serving import explorer, schemas
from twotower.serving.batching import MicroBatcher
from twotower.serving.middleware import BodyLimitMiddleware, MetricsMiddleware, ServiceMetrics
from twotower.serving.retriever import Query as RetrievalQuery
from twotower.serving.retriever import Result, Retriever, UnknownItemError, UnknownQueryError

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class ServiceConfig:
    """How the service runs.

    Args:
        max_body_bytes: the largest request body accepted (413 above it).
        batch_queries: the most queries one micro-batch takes.
        batch_wait_ms: how long a micro-batch waits for more requests before it runs.
        admin_token: when set, ``/admin/*`` needs ``Authorization: Bearer <token>``;
            when not, ``/admin/*`` answers only clients on the loopback address.
        reload_on_sighup: reload the artifact when the process gets SIGHUP (needs the
            main thread's event loop, as under ``twotower serve``).
    """

    max_body_bytes: int = 1 << 20
    batch_queries: int = 256
    batch_wait_ms: float = 0.0
    admin_token: str | None = None
    reload_on_sighup: bool = False


class ServiceState:
    """The artifact being served; swapped whole by a reload."""

    def __init__(self, folder: Path, retriever: Retriever) -> None:
        self.folder = folder
        self.retriever = retriever
        self.reload_lock = asyncio.Lock()
        self.closing = False


def create_app(folder: Path, config: ServiceConfig | None = None) -> FastAPI:
    """The service for the artifact in ``folder``, loaded and verified now.

    Raises:
        DataError: the artifact is missing, corrupt or of another format version.
    """
    config = config or ServiceConfig()
    folder = Path(folder)
    state = ServiceState(folder, _warmed(Retriever.load(folder)))
    metrics = ServiceMetrics()
    metrics.serving(state.retriever.artifact.fingerprint, state.retriever.artifact.index.kind)
    batcher = MicroBatcher(
        lambda: state.retriever, config.batch_queries, config.batch_wait_ms, metrics.observe_batch
    )

    async def reload() -> schemas.ReloadResponse:
        async with state.reload_lock:
            previous = state.retriever.artifact.fingerprint
            started = time.perf_counter()
            try:
                retriever = await asyncio.to_thread(lambda: _warmed(Retriever.load(folder)))
            except DataError as err:
                metrics.reloads.labels("failed").inc()
                log.error("reload failed, still serving %s: %s", previous, err)
                detail = f"reload failed: {err}; still serving {previous}"
                raise HTTPException(409, detail) from None
            state.retriever = retriever
            fingerprint = retriever.artifact.fingerprint
            metrics.serving(fingerprint, retriever.artifact.index.kind)
            metrics.reloads.labels("ok").inc()
            log.info("now serving artifact %s (was %s)", fingerprint, previous)
            return schemas.ReloadResponse(
                artifact=fingerprint, previous=previous, seconds=time.perf_counter() - started
            )

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        batcher.start()
        loop = asyncio.get_running_loop()
        reloads: set[asyncio.Task] = set()  # held, or a running task may be collected

        def on_sighup() -> None:
            task = loop.create_task(_logged(reload()))
            reloads.add(task)
            task.add_done_callback(reloads.discard)

        if config.reload_on_sighup:
            loop.add_signal_handler(signal.SIGHUP, on_sighup)
        try:
            yield
        finally:
            state.closing = True
            if config.reload_on_sighup:
                loop.remove_signal_handler(signal.SIGHUP)
            await asyncio.to_thread(batcher.stop)

    app = FastAPI(
        title="twotower recall service",
        default_response_class=AsciiJSONResponse,
        version=version("twotower"),
        description="Top-K candidate retrieval from an exported two-tower artifact.",
        lifespan=lifespan,
    )
    app.add_middleware(BodyLimitMiddleware, max_bytes=config.max_body_bytes)
    app.add_middleware(MetricsMiddleware, metrics=metrics)
    _add_error_handlers(app)
    errors = {404: {"model": schemas.ErrorResponse}, 422: {"model": schemas.ErrorResponse}}

    async def answer(queries: list[RetrievalQuery]) -> tuple[list[Result | DataError], str]:
        if state.closing or not batcher.running:
            raise HTTPException(503, "the service is shutting down")
        answers, retriever = await batcher.submit(queries)
        return answers, retriever.artifact.fingerprint

    @app.post("/recall", response_model=schemas.RecallResponse, responses=errors)
    async def recall(body: schemas.RecallRequest) -> JSONResponse:
        """The top k items for one query: a known user, raw features (cold start) or text."""
        (result,), fingerprint = await answer([body.query()])
        if isinstance(result, DataError):
            raise HTTPException(_status(result), str(result))
        return AsciiJSONResponse({"artifact": fingerprint, **dataclasses.asdict(result)})

    @app.post("/recall/batch", response_model=schemas.BatchResponse, responses=errors)
    async def recall_batch(body: schemas.BatchRequest) -> JSONResponse:
        """Many queries at once; a query that fails gets its own error and status."""
        results, fingerprint = await answer([q.query() for q in body.queries])
        return AsciiJSONResponse({"artifact": fingerprint, "results": [_entry(r) for r in results]})

    @app.get("/items/{item_id}/similar", response_model=schemas.RecallResponse, responses=errors)
    async def similar(
        item_id: Annotated[str, PathParam(description="An item id, matched by value.")],
        k: Annotated[int, Query(ge=1, le=schemas.MAX_K, description="How many items.")] = 10,
    ) -> JSONResponse:
        """The k items whose vectors are closest to this item's (the item itself left out)."""
        (result,), fingerprint = await answer([RetrievalQuery(item=item_id, k=k)])
        if isinstance(result, DataError):
            raise HTTPException(_status(result), str(result))
        return AsciiJSONResponse({"artifact": fingerprint, **dataclasses.asdict(result)})

    @app.get("/health", response_model=schemas.HealthResponse)
    async def health() -> dict[str, str]:
        """Liveness: 200 while the process answers."""
        return {"status": "ok"}

    @app.get("/ready", response_model=schemas.ReadyResponse, responses={503: {}})
    async def ready() -> JSONResponse:
        """Readiness: 200 with the artifact served, 503 while shutting down."""
        artifact = state.retriever.artifact
        up = batcher.running and not state.closing
        body = {
            "status": "ready" if up else "unavailable",
            "artifact": artifact.fingerprint,
            "items": artifact.index.num_items,
            "index": artifact.index.kind,
            "index_recall": (artifact.manifest.get("index_recall") or {}).get("recall"),
        }
        return AsciiJSONResponse(body, status_code=200 if up else 503)

    @app.get("/metrics", response_class=PlainTextResponse)
    async def prometheus() -> PlainTextResponse:
        """Prometheus text format: requests, latency histogram, errors, batch sizes."""
        return PlainTextResponse(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.post(
        "/admin/reload",
        response_model=schemas.ReloadResponse,
        responses={401: {}, 403: {}, 409: {"model": schemas.ErrorResponse}},
    )
    async def admin_reload(
        request: Request,
        authorization: Annotated[str | None, Header(description="Bearer <token>")] = None,
    ) -> schemas.ReloadResponse:
        """Load the artifact folder again (e.g. after a new export) and serve it."""
        _authorize(config.admin_token, authorization, request.client)
        return await reload()

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def explorer_page() -> HTMLResponse:
        """The retrieval explorer: a user's history and results, text search, neighbours."""
        return HTMLResponse(explorer.page(), headers={"Content-Security-Policy": PAGE_POLICY})

    @app.get("/explorer/info", response_model=schemas.ExplorerInfo)
    async def explorer_info() -> JSONResponse:
        """The artifact's keys, sizes, item fields and whether text search applies."""
        return AsciiJSONResponse(explorer.info(state.retriever.artifact))

    @app.get("/explorer/queries", response_model=schemas.Suggestions)
    async def explorer_suggest(
        prefix: Annotated[str, Query(max_length=200, description="The id's beginning.")] = "",
        limit: Annotated[
            int, Query(ge=1, le=explorer.MAX_SUGGESTIONS, description="How many ids at most.")
        ] = 10,
    ) -> JSONResponse:
        """Known query ids starting with ``prefix`` (for suggestions as one types)."""
        artifact = state.retriever.artifact
        ids = await asyncio.to_thread(explorer.suggest, artifact, prefix, limit)
        return AsciiJSONResponse({"ids": ids})

    @app.get("/explorer/queries/{query_id}", response_model=schemas.QueryRecord, responses=errors)
    async def explorer_query(
        query_id: Annotated[str, PathParam(description="A query id, matched by value.")],
    ) -> JSONResponse:
        """A known query's raw features and its history, with the items' fields."""
        artifact = state.retriever.artifact
        try:
            record = await asyncio.to_thread(explorer.query_record, artifact, query_id)
        except DataError as err:
            raise HTTPException(_status(err), str(err)) from None
        return AsciiJSONResponse(record)

    @app.post("/explorer/items", response_model=schemas.ItemRecords, responses=errors)
    async def explorer_items(body: schemas.ItemsRequest) -> JSONResponse:
        """Items' raw fields (title, genres, ...), in the order asked."""
        artifact = state.retriever.artifact
        try:
            found = await asyncio.to_thread(explorer.items_on_map, artifact, body.ids)
        except DataError as err:
            raise HTTPException(_status(err), str(err)) from None
        return AsciiJSONResponse(found)

    @app.get("/explorer/map", response_model=schemas.CorpusMap)
    async def explorer_map(
        limit: Annotated[
            int, Query(ge=1, le=explorer.MAX_MAP_POINTS, description="How many items at most.")
        ] = 2000,
    ) -> JSONResponse:
        """Items on the first two principal components of the item vectors (a sample)."""
        artifact = state.retriever.artifact
        return AsciiJSONResponse(await asyncio.to_thread(explorer.corpus_map, artifact, limit))

    return app


# The page loads nothing from elsewhere; its script and styles are inline.
PAGE_POLICY = (
    "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
    "connect-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none'"
)


class AsciiJSONResponse(JSONResponse):
    """JSON with non-ASCII characters escaped: any text a client sent, even a lone
    surrogate (valid in JSON, not in UTF-8), can be echoed back without failing."""

    def render(self, content: Any) -> bytes:
        return json.dumps(content, separators=(",", ":")).encode("ascii")


def _warmed(retriever: Retriever) -> Retriever:
    """Runs one query of each cheap kind, so the first request is not the slow one."""
    artifact = retriever.artifact
    queries = [RetrievalQuery(item=artifact.item_ids[0].as_py(), k=1)]
    if artifact.queries.num_rows:
        queries.append(RetrievalQuery(user=artifact.queries.column(artifact.query_key)[0].as_py()))
    retriever.retrieve(queries)
    return retriever


async def _logged(reload: Any) -> None:
    """A SIGHUP reload: its failure is logged (and the old artifact kept), never raised."""
    with contextlib.suppress(HTTPException):
        await reload


def _status(error: DataError) -> int:
    return 404 if isinstance(error, (UnknownQueryError, UnknownItemError)) else 422


def _entry(answer: Result | DataError) -> dict[str, Any]:
    if isinstance(answer, DataError):
        error, status = str(answer), _status(answer)
        return {"query": None, "items": [], "scores": [], "error": error, "status": status}
    return {**dataclasses.asdict(answer), "error": None, "status": 200}


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


def _add_error_handlers(app: FastAPI) -> None:
    """Every error as ``{"detail": "..."}``; validation errors as one readable line."""

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = [_describe(error) for error in exc.errors()]
        errors = [
            {"loc": list(e.get("loc", ())), "msg": e.get("msg", ""), "type": e.get("type", "")}
            for e in exc.errors()
        ]
        return AsciiJSONResponse({"detail": "; ".join(problems), "errors": errors}, status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return AsciiJSONResponse({"detail": str(exc.detail)}, status_code=exc.status_code)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unexpected error on %s %s", request.method, request.url.path)
        return AsciiJSONResponse(
            {"detail": "internal error (logged by the service)"}, status_code=500
        )


def _describe(error: dict[str, Any]) -> str:
    """One validation error as text: where, what, and the value sent."""
    loc = [str(part) for part in error.get("loc", ()) if part != "body"]
    where = ".".join(loc) if loc else "body"
    kind = error.get("type", "")
    if kind == "json_invalid":
        reason = error.get("ctx", {}).get("error", "")
        return f"the body is not valid JSON ({reason})"
    if kind == "extra_forbidden":
        return f"unknown field {where!r}"
    if kind == "missing" and where == "body":
        return "the request needs a JSON body"
    if kind == "value_error":
        return f"{where}: {error.get('msg', '').removeprefix('Value error, ')}"
    shown = repr(error.get("input"))
    shown = shown if len(shown) <= 80 else shown[:77] + "..."
    return f"{where}: {error.get('msg', 'invalid')} (got {shown})"
