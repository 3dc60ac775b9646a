"""ASGI middleware of the service: a request-body limit and Prometheus metrics.

Both are plain ASGI (no framework types), so they sit outside the app's routing
and see every request, including ones that match no route.
"""

from __future__ import annotations

import json
import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
)

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)


class ServiceMetrics:
    """The service's Prometheus metrics, in a registry of their own (one per app)."""

    def __init__(self) -> None:
        disable_created_metrics()  # no *_created series beside every counter
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "twotower_http_requests",
            "HTTP requests answered, by route, method and status code.",
            ["route", "method", "status"],
            registry=self.registry,
        )
        self.errors = Counter(
            "twotower_http_errors",
            "HTTP requests answered with a 4xx (client) or 5xx (server) status.",
            ["route", "kind"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "twotower_http_request_duration_seconds",
            "Time from a request's start to the end of its response, by route.",
            ["route"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.batch_queries = Histogram(
            "twotower_batch_queries",
            "Queries embedded and searched together in one micro-batch.",
            buckets=BATCH_BUCKETS,
            registry=self.registry,
        )
        self.batch_seconds = Histogram(
            "twotower_batch_duration_seconds",
            "Time one micro-batch takes: towers, index search and result building.",
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.reloads = Counter(
            "twotower_reloads", "Artifact reloads, by result.", ["result"], registry=self.registry
        )
        self.events = Counter(
            "twotower_events",
            "Events sent to POST /events: stored, or refused (an unknown item).",
            ["outcome"],
            registry=self.registry,
        )
        self._artifact_metrics()
        self._series: dict[tuple[str, str, int], tuple] = {}  # a request's, by its labels

    def _artifact_metrics(self) -> None:
        """What is served: the artifact, its version, the changes of its items."""
        self.artifact = Gauge(
            "twotower_artifact_info",
            "1 for the artifact being served (its index kind, what runs its query tower).",
            ["fingerprint", "index", "runtime"],
            registry=self.registry,
        )
        self.version = Gauge(
            "twotower_artifact_version",
            "The version of the artifact being served (1: as exported; one more for each "
            "change of its catalogue in place).",
            registry=self.registry,
        )
        self.changed_items = Counter(
            "twotower_item_changes",
            "Items changed through POST /admin/items, by kind of change (added, replaced, "
            "blocked, unblocked, removed).",
            ["kind"],
            registry=self.registry,
        )

    def observe_request(self, route: str, method: str, status: int, seconds: float) -> None:
        """Counts and times one request; an error also counted as one. Each label set's
        series are looked up once, then kept (``labels`` takes a lock and hashes)."""
        key = (route, method, status)
        series = self._series.get(key)
        if series is None:
            kind = "server" if status >= 500 else "client"
            error = self.errors.labels(route, kind) if status >= 400 else None
            series = (
                self.requests.labels(route, method, str(status)),
                self.latency.labels(route),
                error,
            )
            self._series[key] = series
        count, latency, error = series
        count.inc()
        latency.observe(seconds)
        if error is not None:
            error.inc()

    def observe_batch(self, queries: int, seconds: float) -> None:
        self.batch_queries.observe(queries)
        self.batch_seconds.observe(seconds)

    def serving(self, fingerprint: str, index: str, runtime: str, version: int) -> None:
        """Marks this artifact as the one served (and no other), at ``version``."""
        self.artifact.clear()
        self.artifact.labels(fingerprint, index, runtime).set(1)
        self.version.set(version)

    def item_changes(self, counts: dict[str, int]) -> None:
        """Counts the items one catalogue change added, replaced, blocked, ..."""
        for kind, count in counts.items():
            self.changed_items.labels(kind).inc(count)


class MetricsMiddleware:
    """Counts every request and times it, labelled by its route's path template."""

    def __init__(self, app: ASGIApp, metrics: ServiceMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            route = getattr(scope.get("route"), "path", "unmatched")
            seconds = time.perf_counter() - started
            self.metrics.observe_request(route, scope["method"], status, seconds)


class BodyLimitMiddleware:
    """Answers 413 to a request whose body is larger than ``max_bytes``.

    A declared ``Content-Length`` over the limit is refused before anything is read;
    a body without one (chunked) is read up to the limit and refused past it. The
    body read is handed on to the app unchanged.
    """

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = None
        for name, value in scope["headers"]:  # the last given, as a dict of them would hold
            if name == b"content-length":
                declared = value
        if declared is not None and (not declared.isdigit() or int(declared) > self.max_bytes):
            await self._refuse(send, declared.decode("latin-1"))
            return
        body = bytearray()
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client went away
                return
            body += message.get("body", b"")
            if len(body) > self.max_bytes:
                await self._refuse(send, f"more than {self.max_bytes}")
                return
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": bytes(body), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _refuse(self, send: Send, size: str) -> None:
        detail = f"request body of {size} bytes is over the limit of {self.max_bytes} bytes"
        payload = json.dumps({"detail": detail}).encode("utf-8")
        await send(
            {
                "type": "http.response.start",
                "status": 413,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(payload)).encode()),
                    (b"connection", b"close"),
                ],
            }
        )
        await send({"type": "http.response.body", "body": payload})
