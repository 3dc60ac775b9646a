"""Micro-batching: concurrent requests are embedded and searched together.

Each request's queries go into one queue; a single worker thread takes whatever
has queued up (up to ``max_queries``), runs one ``Retriever.retrieve`` over all of
it, and hands each request its own answers (all of a batch's in one call onto each
caller's event loop, which then wakes once per batch, not once per request). Under
light load a request runs alone, at once; under heavy load the requests that arrive
while a batch runs form the next batch, so the tower and the index see large
matrices and throughput grows with load instead of requests queueing one by one.
``max_wait_ms`` (default 0) makes the worker wait that long for more requests before
it starts a batch.

The worker reads the retriever to use from ``current`` at the start of each batch,
so swapping in a new artifact never touches a batch in flight. ``between`` runs a
function on the worker itself, after the batches queued before it and before those
queued after: what must not run beside a search (growing a FAISS index in place)
runs there, and every batch sees the served state wholly before or wholly after it.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import itertools
import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

from twotower.errors import DataError
from twotower.serving.query import Query, Result
from twotower.serving.retriever import Retriever

log = logging.getLogger(__name__)

Answer = Result | DataError


@dataclasses.dataclass
class _Job:
    queries: Sequence[Query]
    loop: asyncio.AbstractEventLoop | None  # None: a task's (its future is thread-safe)
    future: asyncio.Future | concurrent.futures.Future
    task: Callable[[], Any] | None = None  # run alone, between two batches, instead


class MicroBatcher:
    """Runs ``Retriever.retrieve`` for concurrent callers on one worker thread.

    Args:
        current: returns the retriever to use; read once per batch.
        max_queries: the most queries one batch takes (a request is never split, so
            one larger than this runs as a batch of its own).
        max_wait_ms: how long a batch waits for more requests before it runs.
        on_batch: called with each batch's number of queries and seconds (metrics).
    """

    def __init__(
        self,
        current: Callable[[], Retriever],
        max_queries: int = 256,
        max_wait_ms: float = 0.0,
        on_batch: Callable[[int, float], None] | None = None,
    ) -> None:
        if max_queries < 1 or max_wait_ms < 0:
            raise ValueError("max_queries must be >= 1 and max_wait_ms >= 0")
        self.current = current
        self.max_queries = max_queries
        self.max_wait = max_wait_ms / 1000
        self.on_batch = on_batch
        self._queue: queue.Queue[_Job | None] = queue.Queue()
        self._held: _Job | None = None  # a task taken while a batch was gathered
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Starts the worker thread."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="twotower-batcher", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        """Finishes the queued requests, then stops the worker."""
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join()
            self._thread = None

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    async def submit(self, queries: Sequence[Query]) -> tuple[list[Answer], Retriever]:
        """This request's answers, one per query, and the retriever that gave them."""
        if not self.running:
            raise RuntimeError("the batcher is not running")
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._queue.put(_Job(queries, loop, future))
        return await future

    def between(self, task: Callable[[], Any]) -> Any:
        """Runs ``task`` on the worker thread between two batches; returns its result
        (or raises its error) once it has run. The batches queued before it are answered
        first, those queued after it once it returns. Where the worker does not run
        (before ``start``, after ``stop``), no batch can run beside it: it runs here.

        Blocks the calling thread (never the worker's own): from async code,
        ``await asyncio.to_thread(batcher.between, task)``.
        """
        if not self.running:
            return task()
        future: concurrent.futures.Future = concurrent.futures.Future()
        self._queue.put(_Job([], None, future, task))
        return future.result()

    def _run(self) -> None:
        torch.set_grad_enabled(False)
        while True:
            jobs = self._take()
            real = [job for job in jobs if job is not None]
            if real and real[0].task is not None:
                _run_task(real[0])
            elif real:
                self._answer(real)
            if len(real) < len(jobs):  # stop() was called
                return

    def _take(self) -> list[_Job | None]:
        """The next batch: one job, then what has queued up, within the limits; a task
        alone (one met while gathering waits for the next call)."""
        first, self._held = self._held or self._queue.get(), None
        jobs = [first]
        if first is None or first.task is not None:
            return jobs
        count = len(first.queries)
        deadline = time.monotonic() + self.max_wait
        while count < self.max_queries:
            remaining = deadline - time.monotonic()
            try:
                job = self._queue.get(block=remaining > 0, timeout=max(remaining, 0) or None)
            except queue.Empty:
                break
            if job is not None and job.task is not None:
                self._held = job
                break
            jobs.append(job)
            if job is None:
                break
            count += len(job.queries)
        return jobs

    def _answer(self, jobs: list[_Job]) -> None:
        queries = [query for job in jobs for query in job.queries]
        started = time.perf_counter()
        retriever = self.current()
        try:
            answers = retriever.retrieve(queries)
        except Exception as err:  # a bug, not a bad query: fail this batch, keep serving
            log.exception("retrieval failed for a batch of %d queries", len(queries))
            _settle_all(jobs, [err] * len(jobs))
            return
        if self.on_batch is not None:
            self.on_batch(len(queries), time.perf_counter() - started)
        ends = list(itertools.accumulate(len(job.queries) for job in jobs))
        starts = [0, *ends[:-1]]
        results = [(answers[a:b], retriever) for a, b in zip(starts, ends, strict=True)]
        _settle_all(jobs, results)


def _run_task(job: _Job) -> None:
    """Runs a ``between`` task and hands its caller the result or the error."""
    try:
        job.future.set_result(job.task())
    except Exception as err:
        job.future.set_exception(err)


def _settle_all(
    jobs: list[_Job], outcomes: list[tuple[list[Answer], Retriever] | Exception]
) -> None:
    """Hands each job its outcome (its answers, or the batch's error): one wake-up of
    each caller's event loop for the whole batch, not one per request."""
    by_loop: dict[asyncio.AbstractEventLoop, list] = {}
    for job, outcome in zip(jobs, outcomes, strict=True):
        by_loop.setdefault(job.loop, []).append((job.future, outcome))
    for loop, settled in by_loop.items():
        with contextlib.suppress(RuntimeError):  # the caller's event loop is closed
            loop.call_soon_threadsafe(_settle, settled)


def _settle(settled: list[tuple[asyncio.Future, Any]]) -> None:
    """Sets each future's result or error, on its own event loop."""
    for future, outcome in settled:
        if future.done():  # the caller went away (cancelled)
            continue
        if isinstance(outcome, Exception):
            future.set_exception(outcome)
        else:
            future.set_result(outcome)
