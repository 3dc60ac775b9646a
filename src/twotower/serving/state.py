"""What the HTTP service's handlers share: the artifact served, its batcher and metrics.

One ``ServiceState`` per app, created by ``create_app`` and kept on ``app.state``;
handlers receive it through ``Depends(service)``. A reload (the endpoint, or SIGHUP
when enabled) loads and verifies the new artifact beside the old one and swaps the
single ``retriever`` reference: batches in flight finish on the old artifact, the next
ones use the new one, and no request is dropped. A reload that fails leaves the old
artifact serving.

A change of the catalogue (``change_items``, ``POST /admin/items``) is written as the
artifact's next version first, then served as a reload is, the next version applied
to the served artifact in place (``versions.py``) rather than the folder loaded whole.
Changes, reloads and the other writers of the folder take turns.

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
from typing import Annotated, Any

from fastapi import Depends, FastAPI, HTTPException, Request

from twotower.errors import DataError
from twotower.serving import schemas
from twotower.serving.artifact import Artifact
from twotower.serving.artifact_files import fingerprint_of
from twotower.serving.batching import MicroBatcher
from twotower.serving.catalogue import ItemUpdate
from twotower.serving.item_changes import ItemChange, prepare_update
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
from twotower.serving.updates import write_update
from twotower.serving.versions import folder_fingerprint, next_version
from twotower.threads import set_threads

log = logging.getLogger(__name__)

WRITE_ATTEMPTS = 3  # a change prepared again on a folder another writer moved on


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
    def version(self) -> int:
        """The version of the artifact being served."""
        return self.retriever.artifact.version

    @property
    def ready(self) -> bool:
        """Whether requests are answered: the batch worker runs and no shutdown began."""
        return self.batcher.running and not self.closing

    async def answer(self, queries: list[Query]) -> tuple[list[Result | DataError], Artifact]:
        """Each query's result (or why it has none), by way of the micro-batcher.

        Args:
            queries: this request's queries, answered in one batch with other requests'.

        Returns:
            One answer per query, in order, and the artifact that gave them.

        Raises:
            HTTPException: 503 while the service is shutting down.
        """
        if not self.ready:
            raise HTTPException(503, "the service is shutting down")
        answers, retriever = await self.batcher.submit(queries)
        return answers, retriever.artifact

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
            await self._serve_folder()
            return schemas.ReloadResponse(
                **answered_by(self.retriever.artifact),
                previous=previous,
                seconds=time.perf_counter() - started,
            )

    async def change_items(self, body: schemas.ItemChanges) -> schemas.ItemChangesResponse:
        """Checks a change of the catalogue, writes it as the artifact's next version,
        then serves that version (in every worker, when this is one of several).

        The version is on disk before it is served, and the answer comes once it is
        served: a change answered survives a restart. Changes take turns with reloads
        and with other writers of the folder (``updates.write_update``'s lock); one
        prepared on a version that another writer has since followed is prepared again
        on the folder's latest version, which is served first.

        Raises:
            HTTPException: 422 naming what is wrong with the change (nothing written);
                409 when it could not be written or served (said which); 503 while
                shutting down.
        """
        if not self.ready:
            raise HTTPException(503, "the service is shutting down")
        started, previous = time.perf_counter(), self.fingerprint
        change = ItemChange(body.upsert, body.block, body.unblock, body.remove, source="upsert")
        lock = self.reload_lock if self.reload_hook is None else contextlib.nullcontext()
        async with lock:
            update, manifest = await self._write(change)
            if manifest is not None:
                await self._serve_folder(f"version {update.version} is written, not served")
        self.metrics.item_changes(update.counts())
        served = answered_by(self.retriever.artifact)
        if manifest is not None:  # this change's version, whichever one serves by now
            served = {"artifact": fingerprint_of(manifest), "version": manifest["version"]}
        return schemas.ItemChangesResponse(
            **served, previous=previous, **update.counts(), seconds=time.perf_counter() - started
        )

    async def _write(self, change: ItemChange) -> tuple[ItemUpdate, dict[str, Any] | None]:
        """``change`` prepared on the served version and written as the next one: the
        update and the manifest written (None: it changes nothing, nothing written)."""
        for _ in range(WRITE_ATTEMPTS):
            artifact = self.retriever.artifact
            if await asyncio.to_thread(folder_fingerprint, self.folder) != artifact.fingerprint:
                await self._serve_folder("the change is not written")  # another writer's first
                artifact = self.retriever.artifact
            try:
                update = await asyncio.to_thread(prepare_update, artifact, change)
            except DataError as err:
                raise HTTPException(422, str(err)) from None
            if update.empty:
                return update, None
            try:
                return update, await asyncio.to_thread(write_update, self.folder, update)
            except DataError as err:  # the folder moved on meanwhile: prepare it again
                log.info("item change not written, preparing it again: %s", err)
        raise HTTPException(
            409, f"the artifact folder kept changing under {WRITE_ATTEMPTS} attempts to write"
        )

    async def _serve_folder(self, unserved: str = "") -> None:
        """Serves the folder's latest version: in every worker through the parent, or
        here (its next version applied in place where it is just that, else loaded).

        Raises:
            HTTPException: 409 when it cannot be served (``unserved``: what that means
                for the request); the served version keeps serving.
        """
        if self.reload_hook is not None:
            try:
                await self.reload_hook()
            except HTTPException as err:
                detail = f"{unserved}: {err.detail}" if unserved else err.detail
                raise HTTPException(409, detail) from None
            return
        previous = self.fingerprint
        try:
            retriever = await asyncio.to_thread(self.load)
        except DataError as err:
            self.failed_reload(str(err))
            detail = f"reload failed: {err}; still serving {previous}"
            raise HTTPException(409, f"{unserved}: {detail}" if unserved else detail) from None
        self.swap(retriever)

    def load(self) -> Retriever:
        """The artifact folder's retriever as configured, warmed (not yet served). Where
        the folder holds the served version's next one, that version applied to the
        served artifact (``versions.next_version``: only its files read, the index
        grown between two batches), sharing the served retriever's store and inputs;
        else the folder loaded whole, over the shared store or over the memory store of
        the retriever served now handed on to the new artifact.

        Raises:
            DataError: the folder holds no valid artifact for this configuration.
        """
        if self.retriever is not None:
            served = self.retriever
            updated = next_version(served.artifact, self.batcher.between)
            if updated is not None:
                return _warmed(served.with_artifact(updated))
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

    async def ingest(self, events: list[Event]) -> tuple[int, list[tuple[int, str]], Artifact]:
        """Appends ``events`` to their users' states: every event whose item the served
        artifact holds, each other one refused by name.

        Returns:
            How many were stored, (position, reason) of each refused one, and the
            artifact that checked them.

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
            retriever = self.retriever
            try:
                refused = await asyncio.to_thread(retriever.ingest, events)
            except StoreUnavailableError as err:
                raise HTTPException(503, str(err)) from None
        stored = len(events) - len(refused)
        self.metrics.events.labels("stored").inc(stored)
        self.metrics.events.labels("refused").inc(len(refused))
        return stored, refused, retriever.artifact

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


def answered_by(artifact: Artifact) -> dict[str, Any]:
    """The fields that name where an answer came from: the artifact's fingerprint and
    its version."""
    return {"artifact": artifact.fingerprint, "version": artifact.version}


def _labels(retriever: Retriever) -> tuple[str, str, str, int]:
    """The served artifact's fingerprint, index kind, tower runtime and version."""
    artifact = retriever.artifact
    return artifact.fingerprint, artifact.index.kind, retriever.runtime.name, artifact.version


def _warmed(retriever: Retriever) -> Retriever:
    """Runs one query of each cheap kind, so the first request is not the slow one."""
    artifact = retriever.artifact
    queries = [Query(item=artifact.item_ids[0].as_py(), k=1)]
    if artifact.queries.num_rows:
        queries.append(Query(user=artifact.queries.column(artifact.query_key)[0].as_py()))
    retriever.retrieve(queries)
    return retriever
