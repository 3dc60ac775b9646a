"""Where one lone request's time goes: HTTP, the hand-off to the batch worker, and each
stage of ``Retriever.retrieve``.

    python benchmarks/request_breakdown.py ARTIFACT [--runtime torch|onnx]
        [--requests 300] [--pause-ms 20] [--threads 1]

The service runs in this process (uvicorn on a loopback port, as ``twotower serve``
runs it), its stages timed by wrapping them; the client is another process sending
one known user's ``POST /recall`` at a time, ``--pause-ms`` apart, each followed by a
``GET /health`` (the floor: HTTP, the client and the event loop, no work). Medians
after the first 50 requests, in ms:

    request          what the client waited for /recall
    health           what it waited for /health
    submit to result the handler's await on the micro-batcher (hand-off + retrieve)
    retrieve         the batch worker's ``retrieve`` call
    user vectors     its stage gathering the users' kept inputs and running the tower
    tower            the tower alone (part of user vectors)
    exclusions, search   its other stages

So: hand-off = submit to result - retrieve; the route's own work (validation, JSON,
middleware) = request - health - submit to result.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import threading
import time
from collections import defaultdict
from pathlib import Path

import pyarrow.parquet as pq
import uvicorn

from twotower.serving import batching, query_sources, retriever, runtime
from twotower.serving.http import create_app
from twotower.serving.server import bind
from twotower.serving.settings import ServiceConfig

CLIENT = """
import json, sys, time, httpx
url, users, pause = sys.argv[1], json.loads(sys.argv[2]), float(sys.argv[3])
out = {"request": [], "health": []}
with httpx.Client(base_url=url, timeout=30) as http:
    for user in users:
        clock = time.perf_counter()
        http.post("/recall", json={"user_id": user, "k": 10}).raise_for_status()
        out["request"].append(time.perf_counter() - clock)
        clock = time.perf_counter()
        http.get("/health").raise_for_status()
        out["health"].append(time.perf_counter() - clock)
        time.sleep(pause)
print(json.dumps(out))
"""
WARMUP = 50


def timed(times: dict[str, list[float]], name: str, function):
    """``function`` with each call's seconds appended to ``times[name]``."""

    def wrapper(*args, **kwargs):
        clock = time.perf_counter()
        try:
            return function(*args, **kwargs)
        finally:
            times[name].append(time.perf_counter() - clock)

    return wrapper


def instrument(times: dict[str, list[float]]) -> None:
    submit = batching.MicroBatcher.submit

    async def timed_submit(self, queries):
        clock = time.perf_counter()
        try:
            return await submit(self, queries)
        finally:
            times["submit to result"].append(time.perf_counter() - clock)

    batching.MicroBatcher.submit = timed_submit
    batching.MicroBatcher._answer = timed(times, "retrieve", batching.MicroBatcher._answer)
    stages = {
        "user vectors": (query_sources.QuerySources, "users"),
        "exclusions": (query_sources.QueryBatch, "exclusions"),
        "search": (retriever.Retriever, "_search"),
    }
    for name, (owner, method) in stages.items():
        setattr(owner, method, timed(times, name, getattr(owner, method)))
    for kind in (runtime.TorchRuntime, runtime.OnnxRuntime):
        kind.vectors = timed(times, "tower", kind.vectors)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("artifact", type=Path)
    parser.add_argument("--runtime", default="torch")
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--pause-ms", type=float, default=20.0)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    times: dict[str, list[float]] = defaultdict(list)
    instrument(times)
    app = create_app(args.artifact, ServiceConfig(threads=args.threads, runtime=args.runtime))
    sock = bind("127.0.0.1", 0)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False))
    threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True).start()
    while not server.started:
        time.sleep(0.01)
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    keys = pq.read_table(args.artifact / "queries.parquet").column(0).to_pylist()
    users = keys[: args.requests]
    command = [sys.executable, "-c", CLIENT, url, json.dumps(users), str(args.pause_ms / 1e3)]
    client = json.loads(subprocess.run(command, capture_output=True, check=True).stdout)
    server.should_exit = True
    times.update(client)
    # the last requests' times: the service's warm-up query at load ran the stages too
    medians = {
        name: round(statistics.median(values[-(args.requests - WARMUP) :]) * 1e3, 2)
        for name, values in times.items()
    }
    order = ["request", "health", "submit to result", "retrieve", "user vectors", "tower"]
    order += ["exclusions", "search"]
    result = {"artifact": args.artifact.name, "runtime": args.runtime}
    print(json.dumps({**result, **{name: medians[name] for name in order}}))


if __name__ == "__main__":
    main()
