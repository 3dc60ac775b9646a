"""What the HTTP service's handlers share: the artifact served, its batcher and metrics.

One ``ServiceState`` per app, created by ``create_app`` and kept on ``app.state``;
handlers receive it through ``Depends(service)``. A reload (the endpoint, or SIGHUP
when enabled) loads and verifies the new artifact beside the old one and swaps the
single ``retriever`` reference: batches in flight finish on the old artifact, the next
ones use the new one, and no request is dropped. A reload that fails leaves the old
artifact serving.

Users' states live in the retriever's ``MemoryStore`` (the artifact's, changed by
events, handed on to the next artifact at a reload) or, with ``config.state``, in one
Redis store that outlives reloads, and the artifact's own users are then not loaded.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Annotated

from fastapi import Depends, FastAPI, HTTPException, Request

from twotower.errors import DataError
from twotower.serving import schemas
from twotower.serving.artifact import Artifact
from twotower.serving.batching import MicroBatcher
from twotower.serving.middleware import ServiceMetrics
from twotower.serving.query import Query, Result
from twotower.serving.query_vectors import read_query_vectors
from twotower.serving.retriever import Retriever
from twotower.serving.settings import ServiceConfig
from twotower.serving.stores import (
    Event,
    MemoryStore,
    StateStore,
    StoreUnavailableError,
    open_store,
)
from twotower.threads import set_threads

log = logging.getLogger(__name__)


class ServiceState:
    """The artifact being served (swapped whole by a reload), its batcher and metrics.

    Args:
        folder: the artifact folder; loaded and verified now, and again on each reload.
        config: how the service runs.

    Raises:
        DataError: the artifact is missing, corrupt or of another format version.
    """

    def __init__(self, folder: Path, config: ServiceConfig) -> None:
        self.folder = Path(folder)
        self.config = config
        set_threads(config.threads)
        # a shared store outlives reloads; None: each retriever's MemoryStore
        self.store: StateStore | None = open_store(config.state) if config.state else None
        self.retriever: Retriever | None = None
        self.retriever = self.load()
        self.metrics = ServiceMetrics()
        self.metrics.serving(*_labels(self.retriever))
        self.batcher = MicroBatcher(
            lambda: self.retriever,
            config.batch_queries,
            config.batch_wait_ms,
            self.metrics.observe_batch,
        )
        self.reload_lock = asyncio.Lock()
        self.closing = False
        self._reloads: set[asyncio.Task] = set()  # held, or a running task may be collected
        # set in a worker process of several (workers.py): reloads then go through the
        # parent, which reloads every worker or none
        self.reload_hook: Callable[[], Awaitable[schemas.ReloadResponse]] | None = None

    @property
    def fingerprint(self) -> str:
        """The fingerprint of the artifact being served."""
        return self.retriever.artifact.fingerprint

    @property
    def ready(self) -> bool:
        """Whether requests are answered: the batch worker runs and no shutdown began."""
        return self.batcher.running and not self.closing

    async def answer(self, queries: list[Query]) -> tuple[list[Result | DataError], str]:
        """Each query's result (or why it has none), by way of the micro-batcher.

        Args:
            queries: this request's queries, answered in one batch with other requests'.

        Returns:
            One answer per query, in order, and the fingerprint of the artifact that
            gave them.

        Raises:
            HTTPException: 503 while the service is shutting down.
        """
        if not self.ready:
            raise HTTPException(503, "the service is shutting down")
        answers, retriever = await self.batcher.submit(queries)
        return answers, retriever.artifact.fingerprint

    async def reload(self) -> schemas.ReloadResponse:
        """Loads the artifact folder again, verifies it, and serves it from now on
        (in every worker process, when it is one of several: ``workers.py``).

        Returns:
            The fingerprints of the new and the replaced artifact, and the time taken.

        Raises:
            HTTPException: 409 when the folder holds no valid artifact; the old one
                keeps serving.
        """
        if self.reload_hook is not None:
            return await self.reload_hook()
        async with self.reload_lock:
            previous = self.fingerprint
            started = time.perf_counter()
            try:
                retriever = await asyncio.to_thread(self.load)
            except DataError as err:
                self.failed_reload(str(err))
                detail = f"reload failed: {err}; still serving {previous}"
                raise HTTPException(409, detail) from None
            self.swap(retriever)
            return schemas.ReloadResponse(
                artifact=self.fingerprint, previous=previous, seconds=time.perf_counter() - started
            )

    def load(self) -> Retriever:
        """The artifact folder's retriever as configured, warmed (not yet served): over
        the shared store, or over the memory store of the retriever served now handed
        on to the new artifact.

        Raises:
            DataError: the folder holds no valid artifact for this configuration.
        """
        config = self.config
        artifact = Artifact.load(self.folder, users=self.store is None)
        vectors = None
        if config.query_vectors is not None:
            vectors = read_query_vectors(config.query_vectors, artifact)
        store = self.store
        if store is None and self.retriever is not None:
            assert isinstance(self.retriever.store, MemoryStore)
            store = self.retriever.store.carried(artifact)
        retriever = Retriever(
            artifact,
            vectors,
            runtime=config.runtime,
            store=store,
            exact_filter_limit=config.exact_filter_limit,
        )
        return _warmed(retriever)

    async def ingest(self, events: list[Event]) -> tuple[int, list[tuple[int, str]]]:
        """Appends ``events`` to their users' states: every event whose item the served
        artifact holds, each other one refused by name.

        Returns:
            How many were stored, and (position, reason) of each refused one.

        Raises:
            HTTPException: 409 with users' states in the memory of one worker of
                several (each would hold its own); 503 when the store is unreachable
                (no event of the batch may be taken as stored) or shutting down.
        """
        if not self.ready:
            raise HTTPException(503, "the service is shutting down")
        if self.store is None and self.reload_hook is not None:
            raise HTTPException(
                409,
                "events need one store for every worker: serve with --state "
                "redis://HOST:PORT/DB, or with one worker",
            )
        # a memory store changes hands at a reload: its events wait for one to end
        lock = self.reload_lock if self.store is None else contextlib.nullcontext()
        async with lock:
            try:
                refused = await asyncio.to_thread(self.retriever.ingest, events)
            except StoreUnavailableError as err:
                raise HTTPException(503, str(err)) from None
        stored = len(events) - len(refused)
        self.metrics.events.labels("stored").inc(stored)
        self.metrics.events.labels("refused").inc(len(refused))
        return stored, refused

    async def store_problem(self) -> str | None:
        """Why the users' state store does not answer now; None when it does."""
        if self.store is None:
            return None
        try:
            await asyncio.to_thread(self.store.ping)
        except StoreUnavailableError as err:
            return str(err)
        return None

    def swap(self, retriever: Retriever) -> None:
        """Serves ``retriever`` from the next batch on; batches in flight finish on the
        one it replaces."""
        previous = self.fingerprint
        self.retriever = retriever
        self.metrics.serving(*_labels(retriever))
        self.metrics.reloads.labels("ok").inc()
        log.info("now serving artifact %s (was %s)", self.fingerprint, previous)

    def failed_reload(self, reason: str) -> None:
        """Counts and logs a reload that failed (the old artifact still serving)."""
        self.metrics.reloads.labels("failed").inc()
        log.error("reload failed, still serving %s: %s", self.fingerprint, reason)

    async def start(self) -> None:
        """Starts the batch worker and, when configured, reloading on SIGHUP."""
        self.batcher.start()
        if self.config.reload_on_sighup:
            asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, self._on_sighup)

    async def stop(self) -> None:
        """Refuses new requests, then lets the batch worker finish the queued ones."""
        self.closing = True
        if self.config.reload_on_sighup:
            asyncio.get_running_loop().remove_signal_handler(signal.SIGHUP)
        await asyncio.to_thread(self.batcher.stop)
        if self.store is not None:
            self.store.close()

    @contextlib.asynccontextmanager
    async def lifespan(self, app: FastAPI) -> AsyncIterator[None]:
        """The app's lifespan: ``start`` before the first request, ``stop`` after the last."""
        await self.start()
        try:
            yield
        finally:
            await self.stop()

    def _on_sighup(self) -> None:
        task = asyncio.get_running_loop().create_task(self._logged_reload())
        self._reloads.add(task)
        task.add_done_callback(self._reloads.discard)

    async def _logged_reload(self) -> None:
        """A SIGHUP reload: its failure is logged (and the old artifact kept), never raised."""
        with contextlib.suppress(HTTPException):
            await self.reload()


async def service(request: Request) -> ServiceState:
    """The app's ``ServiceState``: a dependency for handlers (``Service``); async, so
    FastAPI calls it on the event loop instead of handing it to a thread."""
    return request.app.state.service


Service = Annotated[ServiceState, Depends(service)]


def _labels(retriever: Retriever) -> tuple[str, str, str]:
    """The served artifact's fingerprint, index kind and tower runtime."""
    return retriever.artifact.fingerprint, retriever.artifact.index.kind, retriever.runtime.name


def _warmed(retriever: Retriever) -> Retriever:
    """Runs one query of each cheap kind, so the first request is not the slow one."""
    artifact = retriever.artifact
    queries = [Query(item=artifact.item_ids[0].as_py(), k=1)]
    if artifact.queries.num_rows:
        queries.append(Query(user=artifact.queries.column(artifact.query_key)[0].as_py()))
    retriever.retrieve(queries)
    return retriever
