"""How the HTTP service runs: settings that import nothing heavy (no torch, no web
framework), so that the parent of several workers stays small."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Literal, get_args

from twotower.errors import ConfigError

Runtime = Literal["torch", "onnx"]
RUNTIMES: tuple[str, ...] = get_args(Runtime)  # what may run the query tower
# A filter that keeps at most this many items is searched exactly over them on an
# approximate index (docs/serving.md, "Filters"; measured in docs/benchmarks.md).
EXACT_FILTER_LIMIT = 20_000


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
        threads: CPU threads torch computes with, for the whole process; None: the
            thread variables where set, else the CPUs this process may use
            (``twotower.threads.default_threads``).
        query_vectors: a file of the artifact's known users' precomputed vectors
            (``twotower.serving.query_vectors``), read again on each reload; a reload
            whose artifact the file does not match fails and the old artifact keeps
            serving.
        runtime: what runs the query tower (``twotower.serving.runtime``): ``torch``, or
            ``onnx`` (the artifact's ONNX graph on ONNX Runtime, ``twotower export
            --onnx``), with which a reload whose artifact lacks the graph fails and the
            old artifact keeps serving.
        state: where users' states live: None, in the service's memory, starting from
            the artifact's (``MemoryStore``); or a Redis URL (``redis://HOST:PORT/DB``,
            ``rediss://`` or ``unix://``), which every replica may share and which
            ``twotower state load`` fills from an artifact (``RedisStore``).
        ingest_token: when set, ``POST /events`` takes it (or the admin token) as
            ``Authorization: Bearer <token>``; with neither set, loopback clients only.
        exact_filter_limit: on an approximate index (HNSW, IVF-PQ), a query whose
            filter keeps at most this many items is searched exactly over them
            (``twotower.serving.catalogue``); 0: never.

    Raises:
        ConfigError: a value out of its range, an unknown runtime, a state URL of
            another scheme, or precomputed query vectors with a Redis state.
    """

    max_body_bytes: int = 1 << 20
    batch_queries: int = 256
    batch_wait_ms: float = 0.0
    admin_token: str | None = None
    reload_on_sighup: bool = False
    threads: int | None = None
    query_vectors: Path | None = None
    runtime: Runtime = "torch"
    state: str | None = None
    ingest_token: str | None = None
    exact_filter_limit: int = EXACT_FILTER_LIMIT

    def __post_init__(self) -> None:
        if self.batch_queries < 1 or self.batch_wait_ms < 0 or self.max_body_bytes < 1:
            raise ConfigError(
                "--batch-queries and --max-body-bytes must be >= 1, --batch-wait-ms >= 0"
            )
        if self.exact_filter_limit < 0:
            raise ConfigError(f"--exact-filter-limit must be >= 0, got {self.exact_filter_limit}")
        check_runtime(self.runtime)
        if self.state is not None:
            check_state_url(self.state)
            if self.query_vectors is not None:
                raise ConfigError(
                    "--query-vectors hold users' exported vectors, but with --state their "
                    "states live in Redis and change with events: give one of the two"
                )


STATE_SCHEMES = ("redis://", "rediss://", "unix://")


def check_state_url(url: str) -> None:
    """Refuses a user-state store URL that is not a Redis one.

    Raises:
        ConfigError: naming the URL (without a password) and the schemes taken.
    """
    if not url.startswith(STATE_SCHEMES):
        shown = url.split("@")[-1]
        raise ConfigError(
            f"--state {shown!r}: not a Redis URL; give redis://HOST:PORT/DB (or rediss://, "
            "unix://), or leave it out to keep users' states in memory"
        )


def check_runtime(name: str) -> None:
    """Refuses a tower runtime that is not one of ``RUNTIMES``.

    Raises:
        ConfigError: naming the runtime and the choices.
    """
    if name not in RUNTIMES:
        raise ConfigError(f"unknown tower runtime {name!r}; choose one of {', '.join(RUNTIMES)}")
