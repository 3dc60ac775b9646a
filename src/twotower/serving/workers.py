"""Several worker processes serving one artifact on one socket (``serve --workers N``).

    parent       binds the socket, starts N workers, starts again one that dies,
                 stops them on SIGINT or SIGTERM, and runs every reload; it imports
                 neither torch nor the web framework
    fork server  multiprocessing's: imports the service's modules once (``PRELOAD``)
                 and forks each worker, so the workers share those pages too
    worker       the service of ``http.py``, accepting connections on the shared socket

One process answers on one core at a time (one interpreter lock); N workers use N.
Memory: each worker maps the artifact's large files instead of reading them (the item
vectors, the index, the query tower's weights; ``Artifact.load``), so the workers share
one copy of those in the page cache; the tables, the known users' kept inputs and the
interpreter are each worker's own. ``/metrics`` counts the worker that answers it.

**Reloads are all or nothing.** SIGHUP to the parent, or ``POST /admin/reload`` to
any worker, makes the parent ask every worker to load and verify the artifact folder
beside the artifact it serves (``prepare``). Only when every worker has loaded the
same artifact does each swap it in (``commit``); otherwise each drops what it loaded
(``abort``), every worker keeps serving the old artifact, and the request is answered
409 with the reason. The swaps themselves happen one worker after another, within
milliseconds.

A worker that dies is started again (after 1 s, doubling to 30 s while it keeps
failing). It loads the folder as it is; if that is not the artifact the others serve
(a new export not yet reloaded), a reload brings them all to it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import multiprocessing
import os
import queue
import signal
import socket
import sys
import threading
import time
from multiprocessing.connection import Connection, wait
from pathlib import Path
from typing import TYPE_CHECKING, Any

from twotower.errors import DataError
from twotower.serving.settings import ServiceConfig

if TYPE_CHECKING:
    from twotower.serving import schemas
    from twotower.serving.state import ServiceState

log = logging.getLogger(__name__)

# Imported once by the process that forks the workers, so that their interpreters
# share those pages; the parent itself imports none of them (it stays small).
PRELOAD = ["twotower.serving.http", "twotower.serving.runtime", "faiss", "onnxruntime"]
POLL_SECONDS = 0.2  # how often the parent looks at signals between messages
FIRST_BACKOFF, LAST_BACKOFF = 1.0, 30.0  # before starting a dead worker again


@dataclasses.dataclass
class _Worker:
    """The parent's handle on one worker process."""

    number: int
    process: multiprocessing.process.BaseProcess
    conn: Connection
    fingerprint: str | None = None  # None while it starts
    backoff: float = FIRST_BACKOFF
    restart_at: float | None = None  # when dead: when to start it again


class Supervisor:
    """The parent process of N workers.

    Args:
        folder: the artifact folder.
        config: the service's settings (each worker's).
        sock: the listening socket the workers share.
        count: how many workers.
    """

    def __init__(
        self,
        folder: Path,
        config: ServiceConfig,
        sock: socket.socket,
        count: int,
    ) -> None:
        self.folder = Path(folder)
        self.config = dataclasses.replace(config, reload_on_sighup=False)
        self.sock = sock
        # workers are forked from a server process that only imported PRELOAD (never
        # from this one, nor from a process with threads)
        self.context = multiprocessing.get_context("forkserver")
        self.context.set_forkserver_preload(PRELOAD)
        self.workers = [self._spawn(number) for number in range(count)]
        self.fingerprint: str | None = None
        self.requests: list[_Worker] = []  # workers whose client asked for a reload
        self.stopping = False
        self.hangup = False

    def start(self) -> str:
        """Waits until every worker serves; returns the artifact's fingerprint.

        Raises:
            DataError: a worker could not load the artifact (its reason), or the
                workers loaded different artifacts (the folder changed meanwhile).
        """
        for worker in self.workers:
            kind, value = self._reply(worker)
            if kind != "ready":
                self.stop()
                raise DataError(f"worker {worker.number} did not start: {value}")
            worker.fingerprint = value
        fingerprints = {worker.fingerprint for worker in self.workers}
        if len(fingerprints) > 1:
            self.stop()
            raise DataError(
                f"{self.folder}: the workers loaded different artifacts "
                f"({', '.join(sorted(fingerprints))}): it changed while they started"
            )
        self.fingerprint = fingerprints.pop()
        return self.fingerprint

    def run(self) -> None:
        """Supervises until SIGINT or SIGTERM: reloads on SIGHUP and on the workers'
        requests, starts dead workers again; then stops every worker."""
        previous = {
            sig: signal.signal(sig, self._on_signal)
            for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
        }
        try:
            while not self.stopping:
                self.step()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            self.stop()

    def step(self) -> None:
        """One round: pending reloads, then the workers' messages and deaths."""
        if self.hangup:
            self.hangup = False
            self.reload()
        while self.requests:
            worker = self.requests.pop(0)
            answer = self.reload()
            if worker.process.is_alive():
                worker.conn.send(("answer", answer))
        now = time.monotonic()
        for place, worker in enumerate(self.workers):
            if worker.restart_at is not None and now >= worker.restart_at:
                self.workers[place] = self._spawn(worker.number)
                self.workers[place].backoff = min(worker.backoff * 2, LAST_BACKOFF)
        alive = [worker for worker in self.workers if worker.restart_at is None]
        handles = {worker.conn: worker for worker in alive}
        handles.update({worker.process.sentinel: worker for worker in alive})
        for ready in wait(list(handles), timeout=POLL_SECONDS):
            worker = handles[ready]
            if worker.restart_at is not None:
                continue  # its death was seen through its other handle
            if worker.process.is_alive():
                self._on_message(worker)
            elif not self.stopping:
                self._died(worker)

    def reload(self) -> dict[str, Any]:
        """Every worker loads the folder's artifact, then all swap it in, or none does.

        Returns:
            ``ReloadResponse``'s fields, or ``{"error": reason}`` when any worker
            failed (every worker still serves the old artifact).
        """
        started, previous = time.perf_counter(), self.fingerprint
        live = [w for w in self.workers if w.fingerprint is not None and w.restart_at is None]
        for worker in live:
            worker.conn.send(("prepare",))
        replies = [(worker, self._reply(worker)) for worker in live]
        failures = [f"worker {w.number}: {value}" for w, (kind, value) in replies if kind != "ok"]
        loaded = {value for _, (kind, value) in replies if kind == "ok"}
        if not failures and len(loaded) > 1:
            failures = [f"the workers loaded different artifacts ({', '.join(sorted(loaded))})"]
        if failures or not live:
            reason = "; ".join(failures) or "no worker is serving"
            for worker in live:
                worker.conn.send(("abort", reason))
            log.error("reload failed, every worker still serves %s: %s", previous, reason)
            return {"error": f"reload failed: {reason}; still serving {previous}"}
        for worker in live:
            worker.conn.send(("commit",))
        for worker in live:
            self._reply(worker)
            worker.fingerprint = next(iter(loaded))
        self.fingerprint = next(iter(loaded))
        log.info("every worker now serves %s (was %s)", self.fingerprint, previous)
        return {
            "artifact": self.fingerprint,
            "previous": previous,
            "seconds": time.perf_counter() - started,
        }

    def stop(self) -> None:
        """Asks every worker to finish (SIGTERM: uvicorn's graceful shutdown) and waits."""
        self.stopping = True
        for worker in self.workers:
            if worker.restart_at is None and worker.process.is_alive():
                worker.process.terminate()
        for worker in self.workers:
            if worker.restart_at is not None:
                continue
            worker.process.join(timeout=30)
            if worker.process.is_alive():
                worker.process.kill()
                worker.process.join()

    def _spawn(self, number: int) -> _Worker:
        parent_end, child_end = self.context.Pipe()
        process = self.context.Process(
            target=run_worker,
            args=(self.folder, self.config, self.sock, child_end),
            name=f"twotower-worker-{number}",
            daemon=True,
        )
        process.start()
        child_end.close()
        return _Worker(number, process, parent_end)

    def _reply(self, worker: _Worker) -> tuple[str, Any]:
        """The worker's next answer, keeping aside its clients' reload requests;
        ``("failed", why)`` when it dies first."""
        while True:
            try:
                message = worker.conn.recv()
            except (EOFError, OSError):
                worker.process.join(timeout=5)
                return "failed", f"exited with status {worker.process.exitcode}"
            if message[0] == "reload":
                self.requests.append(worker)
                continue
            return message[0], message[1] if len(message) > 1 else None

    def _on_message(self, worker: _Worker) -> None:
        try:
            message = worker.conn.recv()
        except (EOFError, OSError):
            return  # its death is seen through its sentinel
        if message[0] == "reload":
            self.requests.append(worker)
        elif message[0] == "ready":
            worker.fingerprint = message[1]
            worker.backoff = FIRST_BACKOFF
            log.info("worker %d serves %s", worker.number, worker.fingerprint)
            if worker.fingerprint != self.fingerprint:  # the folder changed: bring all to it
                self.reload()
        elif message[0] == "failed":
            log.error("worker %d did not start: %s", worker.number, message[1])

    def _died(self, worker: _Worker) -> None:
        """Notes a worker's death; ``step`` starts it again after its backoff."""
        worker.process.join(timeout=5)
        log.error(
            "worker %d (pid %s) exited with status %s; starting it again in %.0f s",
            worker.number,
            worker.process.pid,
            worker.process.exitcode,
            worker.backoff,
        )
        worker.conn.close()
        worker.fingerprint = None
        worker.restart_at = time.monotonic() + worker.backoff

    def _on_signal(self, signum: int, frame: Any) -> None:
        if signum == signal.SIGHUP:
            self.hangup = True
        else:
            self.stopping = True


class _ParentLink:
    """A worker's side of its pipe to the parent: reload requests out, and prepare,
    commit, abort and answers in (on a thread of its own)."""

    def __init__(self, state: ServiceState, conn: Connection) -> None:
        self.state = state
        self.conn = conn
        self.pending = None  # a loaded, not yet served retriever
        self.answers: queue.Queue[dict[str, Any]] = queue.Queue()
        self.asking = threading.Lock()  # one reload request of this worker at a time
        self.sending = threading.Lock()

    def start(self) -> None:
        threading.Thread(target=self._listen, name="twotower-parent-link", daemon=True).start()

    async def reload(self) -> schemas.ReloadResponse:
        """A reload of every worker, through the parent (``ServiceState.reload_hook``)."""
        from fastapi import HTTPException

        from twotower.serving import schemas

        answer = await asyncio.to_thread(self._ask)
        if "error" in answer:
            raise HTTPException(409, answer["error"])
        return schemas.ReloadResponse(**answer)

    def send(self, message: tuple) -> None:
        with self.sending:
            self.conn.send(message)

    def _ask(self) -> dict[str, Any]:
        with self.asking:
            self.send(("reload",))
            return self.answers.get()

    def _listen(self) -> None:
        while True:
            try:
                message = self.conn.recv()
            except (EOFError, OSError):  # the parent is gone: stop serving, gracefully
                os.kill(os.getpid(), signal.SIGTERM)
                return
            kind = message[0]
            if kind == "prepare":
                try:
                    self.pending = self.state.load()
                    self.send(("ok", self.pending.artifact.fingerprint))
                except Exception as err:  # any failure must reach the parent, or it waits
                    self.pending = None
                    self.send(("failed", str(err) or type(err).__name__))
            elif kind == "commit":
                self.state.swap(self.pending)
                self.pending = None
                self.send(("committed",))
            elif kind == "abort":
                self.pending = None
                self.state.failed_reload(message[1])
            elif kind == "answer":  # after this reload's commit, before any other's
                answer = message[1]
                if "error" not in answer:
                    answer = {**answer, "version": self.state.version}
                self.answers.put(answer)


def run_worker(folder: Path, config: ServiceConfig, sock: socket.socket, conn: Connection) -> None:
    """A worker process: loads the artifact, reports to the parent, serves on ``sock``."""
    from twotower.serving.http import create_app

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("faiss").setLevel(logging.WARNING)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)  # the parent's to act on
    try:
        app = create_app(folder, config)
    except Exception as err:
        conn.send(("failed", str(err) or type(err).__name__))
        raise SystemExit(1) from None
    state = app.state.service
    link = _ParentLink(state, conn)
    state.reload_hook = link.reload
    link.start()
    link.send(("ready", state.fingerprint))
    serve_app(app, sock)


# How long a thread that wants the interpreter lock waits before the holder is asked to
# let go (Python's default: 5 ms). The event loop and the batch worker share the lock,
# so at the default a request can wait 5 ms for the other thread's bytecode. At 0.5 ms,
# measured alone with the service on a core of its own, the open loop's p99 for known
# users at 1,000 requests/s on 1M items went from 5.8 to 4.8 and 5.7 ms in two runs, and
# the saturation from 3,659 to 4,080 and 4,162 requests/s (docs/benchmarks.md).
SWITCH_INTERVAL_S = 0.0005


def serve_app(app: Any, sock: socket.socket) -> None:
    """Serves the ASGI ``app`` with uvicorn on the bound ``sock`` until SIGINT or
    SIGTERM, the interpreter lock handed between threads every ``SWITCH_INTERVAL_S``."""
    import uvicorn

    sys.setswitchinterval(SWITCH_INTERVAL_S)
    server = uvicorn.Server(
        uvicorn.Config(app, log_level="warning", access_log=False, timeout_graceful_shutdown=10)
    )
    server.run(sockets=[sock])
