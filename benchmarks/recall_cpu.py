"""CPU seconds per ``POST /recall`` request, in one process, without a network.

    python benchmarks/recall_cpu.py --out runs/openloop [--items 100000] [--index hnsw]
        [--requests 3000] [--concurrency 1,32] [--bodies known,cold,history,filtered]

The app of ``twotower.serving.http`` is called as ASGI directly (no server, no
sockets), ``concurrency`` requests in flight at a time, so that the micro-batcher
gathers up to that many. What is counted is the process's CPU time (every thread:
the event loop and the batch worker) divided by the requests answered: a figure that
holds on a machine whose cores are busy with other work, where wall-clock latency
does not. It measures what the service's own Python costs per request (decode,
validate, batch, search, encode), not the HTTP server or the network, which
``benchmarks/openloop.py`` measures on a quiet machine.

The artifact is ``benchmarks/serving.py``'s (built once in ``--out`` and reused).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parent))
from openloop import bodies as openloop_bodies  # noqa: E402
from serving import build  # noqa: E402

from twotower.serving.http import ServiceConfig, create_app  # noqa: E402


def bodies(artifact: Path, kind: str, count: int = 2000, seed: int = 1) -> list[bytes]:
    """Request bodies of one kind: ``known``, ``history`` (a known user with its recent
    items sent along) and ``cold`` as ``openloop.py`` sends them; ``filtered`` a known
    user with a filter on the item table's first numeric column."""
    if kind in ("known", "history", "cold"):
        return [body.encode() for body in openloop_bodies(artifact, kind, count, seed)]
    items = pq.read_table(artifact / "items.parquet")
    manifest = json.loads((artifact / "manifest.json").read_text())
    if kind == "filtered":
        known = [json.loads(body) for body in openloop_bodies(artifact, "known", count, seed)]
        column = next(
            f.name
            for f in items.schema
            if f.name != manifest["item_key"]
            and (pa.types.is_integer(f.type) or pa.types.is_floating(f.type))
        )
        values = items.column(column).to_numpy(zero_copy_only=False).astype(np.float64)
        bound = float(np.nanmedian(values))  # a missing value matches no condition
        return [json.dumps({**body, "filter": {column: {"lt": bound}}}).encode() for body in known]
    raise SystemExit(f"unknown body kind {kind!r}; choose known, cold, history or filtered")


async def _call(app, body: bytes) -> int:
    """One request through the ASGI app; its status."""
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/recall",
        "raw_path": b"/recall",
        "root_path": "",
        "query_string": b"",
        "headers": [
            (b"host", b"bench"),
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
        ],
        "client": ("127.0.0.1", 50000),
        "server": ("bench", 80),
    }
    sent = False
    status = 0

    async def receive():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        await asyncio.sleep(3600)
        return {"type": "http.disconnect"}

    async def send(message):
        nonlocal status
        if message["type"] == "http.response.start":
            status = message["status"]

    await app(scope, receive, send)
    return status


async def _drive(app, payloads: list[bytes], requests: int, concurrency: int) -> tuple[float, int]:
    """CPU seconds for ``requests`` requests, ``concurrency`` in flight; non-200 count."""
    statuses: list[int] = []

    async def client(start: int) -> None:
        for n in range(start, requests, concurrency):
            statuses.append(await _call(app, payloads[n % len(payloads)]))

    await asyncio.gather(*(client(c) for c in range(min(concurrency, 8))))  # warm up
    statuses.clear()
    started = time.process_time()
    await asyncio.gather(*(client(c) for c in range(concurrency)))
    return time.process_time() - started, sum(s != 200 for s in statuses)


async def measure(artifact: Path, kinds: list[str], requests: int, levels: list[int]) -> list:
    """One row per body kind and concurrency: CPU microseconds per request."""
    app = create_app(artifact, ServiceConfig(threads=1))
    rows = []
    async with app.router.lifespan_context(app):
        for kind in kinds:
            payloads = bodies(artifact, kind)
            for concurrency in levels:
                seconds, failed = await _drive(app, payloads, requests, concurrency)
                rows.append((kind, concurrency, 1e6 * seconds / requests, failed))
                print(
                    f"{kind:>9} concurrency {concurrency:>3}: "
                    f"{1e6 * seconds / requests:8.0f} CPU us/request ({failed} not 200)",
                    flush=True,
                )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("runs/openloop"))
    parser.add_argument("--items", type=int, default=100_000)
    parser.add_argument("--index", default="hnsw")
    parser.add_argument("--requests", type=int, default=3000)
    parser.add_argument("--concurrency", default="1,32")
    parser.add_argument("--bodies", default="known,cold,history,filtered")
    args = parser.parse_args()
    artifact = build(args.out, args.items, [args.index])[args.index]
    levels = [int(c) for c in args.concurrency.split(",")]
    asyncio.run(measure(artifact, args.bodies.split(","), args.requests, levels))


if __name__ == "__main__":
    main()
