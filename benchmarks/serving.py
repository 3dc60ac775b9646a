"""Latency and throughput of ``POST /recall`` over real HTTP, beside in-process search.

    python benchmarks/serving.py --out runs/serving [--items 100000,1000000]
        [--indexes exact,hnsw] [--concurrency 1,8,32] [--duration 10]

For each corpus size N it builds a synthetic dataset (the built-in generator: 5,000
users, N items), trains the demo model for one epoch (towers 128-64, so D = 64) and
exports it once per index kind; these stay in ``--out`` and are reused by later runs.
For each artifact it then measures, on this machine:

- in-process: the index search alone for one query and per query in a batch of 32,
  and ``Retriever.retrieve`` for one known user (feature lookup, query tower, search);
- the memory-bandwidth floor of a brute-force scan: N x D x 4 bytes at the streaming
  read bandwidth measured here (the best of several passes over a 512 MiB buffer);
- over HTTP: ``twotower serve`` in its own process, and a load client in this one
  keeping C keep-alive connections busy with ``/recall`` of random known users
  (k = 10, seen items excluded) for ``--duration`` seconds after a 1 s warm-up:
  requests/s, latency p50/p99, errors, the mean micro-batch size the service saw,
  and the service's resident memory.

The load client and the service share the machine's cores: on a 2-core machine the
figures are a floor for what a separate client machine would see.
Results: ``OUT/serving.json`` and a Markdown table in ``OUT/serving.md``.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from twotower.demo import _write_synthetic, demo_config
from twotower.export import export_run
from twotower.serving import Retriever
from twotower.serving.query import Query
from twotower.towers.model import embed_rows
from twotower.training.run import train_run

USERS = 5000
K = 10


def build(out: Path, num_items: int, kinds: list[str]) -> dict[str, Path]:
    """Trains one run on N synthetic items and exports it per index kind (cached)."""
    folder = out / f"n{num_items}"
    artifacts = {kind: folder / f"artifact-{kind}" for kind in kinds}
    if all((path / "manifest.json").is_file() for path in artifacts.values()):
        return artifacts
    run = folder / "run"
    if not (run / "checkpoints" / "best.json").is_file():
        overrides = [
            "training.epochs=1",
            "training.tensorboard=false",
            "training.ks=[10]",
            "training.device=cpu",
            f"data.synthetic.num_queries={USERS}",
            f"data.synthetic.num_items={num_items}",
        ]
        config = demo_config(overrides)
        config = dataclasses.replace(config, data=_write_synthetic(config, folder / "data"))
        clock = time.perf_counter()
        train_run(config, run)
        print(f"  trained on N={num_items} in {time.perf_counter() - clock:.0f} s", flush=True)
    for kind, path in artifacts.items():
        if not (path / "manifest.json").is_file():
            clock = time.perf_counter()
            manifest = export_run(run, path, index=kind)
            recall = manifest["index_recall"]["recall"]
            print(
                f"  exported {kind} in {time.perf_counter() - clock:.0f} s "
                f"(recall@10 against exact {recall:.4f})",
                flush=True,
            )
    return artifacts


def read_bandwidth(repeats: int = 7) -> float:
    """Streaming read bandwidth in bytes/s: the best pass summing a 512 MiB buffer."""
    buffer = np.ones(1 << 27, dtype=np.float32)  # 512 MiB
    best = float("inf")
    for _ in range(repeats):
        clock = time.perf_counter()
        np.add.reduce(buffer.reshape(-1, 1024), axis=0)  # one pass, vectorized adds
        best = min(best, time.perf_counter() - clock)
    return buffer.nbytes / best


def median_ms(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        clock = time.perf_counter()
        fn()
        times.append(time.perf_counter() - clock)
    return 1000 * statistics.median(times)


def in_process(artifact: Path, users: list) -> dict[str, float]:
    """Median milliseconds of the index search alone and of a whole retrieval."""
    retriever = Retriever.load(artifact)
    rng = np.random.default_rng(0)
    picked = [users[i] for i in rng.choice(len(users), 32, replace=False)]
    rows = retriever.artifact.query_rows(picked)
    artifact_ = retriever.artifact
    table = artifact_.queries.take(rows)
    queries = embed_rows(artifact_.query_tower, artifact_.pipeline, "query", table).numpy()
    seen = retriever.artifact.seen[rows]
    index = retriever.artifact.index
    return {
        "search_1_ms": median_ms(lambda: index.search(queries[:1], K, seen[:1]), 50),
        "search_32_per_query_ms": median_ms(lambda: index.search(queries, K, seen), 20) / 32,
        "retrieve_1_ms": median_ms(lambda: retriever.retrieve([Query(user=picked[0], k=K)]), 50),
    }


def start_server(
    artifact: Path, options: list[str] = (), prefix: list[str] = ()
) -> tuple[subprocess.Popen, str]:
    """``twotower serve`` on a free port, its output in ``serve.log`` beside the artifact;
    ``prefix`` goes before the command (``taskset -c 1``)."""
    command = [*prefix, sys.executable, "-m", "twotower", "serve", str(artifact), "--port", "0"]
    command += options
    return launch(command, artifact.parent / f"serve-{artifact.name}.log")


def launch(command: list[str], log: Path) -> tuple[subprocess.Popen, str]:
    """Runs ``command``, its output in ``log``, until it prints the line ``twotower
    serve`` prints once it listens ("Serving ... on URL ..."); returns it and the URL."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with open(log, "wb") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env)
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline and process.poll() is None:
        found = re.search(r"^Serving .* on (http://\S+) ", log.read_text(), re.M)
        if found:
            return process, found.group(1)
        time.sleep(0.1)
    process.kill()
    raise RuntimeError(f"the service did not start:\n{log.read_text()}")


def requests_for(users: list, count: int = 512) -> list[bytes]:
    rng = np.random.default_rng(1)
    out = []
    for user in rng.choice(users, count):
        body = json.dumps({"user_id": int(user), "k": K}).encode()
        head = (
            "POST /recall HTTP/1.1\r\nHost: bench\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n"
        )
        out.append(head.encode() + body)
    return out


async def exchange(reader, writer, request: bytes) -> bytes:
    """Sends one request on a keep-alive connection, reads the whole answer; returns
    its status line."""
    writer.write(request)
    status = await reader.readline()
    length = 0
    while (line := await reader.readline()) not in (b"\r\n", b""):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":")[1])
    await reader.readexactly(length)
    return status


async def _connection(host: str, port: int, requests: list[bytes], offset: int, until: float):
    reader, writer = await asyncio.open_connection(host, port)
    latencies, errors, i = [], 0, offset
    try:
        while time.perf_counter() < until:
            clock = time.perf_counter()
            status = await exchange(reader, writer, requests[i % len(requests)])
            i += 1
            latencies.append(time.perf_counter() - clock)
            errors += b" 200 " not in status
    finally:
        writer.close()
    return latencies, errors


async def _load(url: str, requests: list[bytes], connections: int, seconds: float):
    host, port = url.removeprefix("http://").rsplit(":", 1)
    until = time.perf_counter() + seconds
    tasks = [_connection(host, int(port), requests, 97 * c, until) for c in range(connections)]
    return await asyncio.gather(*tasks)


def load_test(url: str, requests: list[bytes], connections: int, seconds: float) -> dict:
    asyncio.run(_load(url, requests, connections, 1.0))  # warm-up, not counted
    before = batch_stats(url)
    clock = time.perf_counter()
    results = asyncio.run(_load(url, requests, connections, seconds))
    elapsed = time.perf_counter() - clock
    after = batch_stats(url)
    latencies = np.concatenate([np.array(r[0]) for r in results]) * 1000
    batches = after[1] - before[1]
    return {
        "connections": connections,
        "requests": int(len(latencies)),
        "errors": int(sum(r[1] for r in results)),
        "requests_per_s": len(latencies) / elapsed,
        "p50_ms": float(np.percentile(latencies, 50)),
        "p99_ms": float(np.percentile(latencies, 99)),
        "mean_batch": (after[0] - before[0]) / batches if batches else 0.0,
    }


def batch_stats(url: str) -> tuple[float, float]:
    """(queries, batches) so far, from the service's own /metrics."""
    import urllib.request

    text = urllib.request.urlopen(f"{url}/metrics", timeout=30).read().decode()
    total = float(re.search(r"^twotower_batch_queries_sum (\S+)", text, re.M).group(1))
    count = float(re.search(r"^twotower_batch_queries_count (\S+)", text, re.M).group(1))
    return total, count


def rss_mib(pid: int) -> float:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"VmRSS:\s+(\d+) kB", status).group(1)) / 1024


def measure(artifact: Path, levels: list[int], seconds: float, floor_ms: float) -> dict:
    manifest = json.loads((artifact / "manifest.json").read_text())
    retriever_users = _known_users(artifact)
    result = {
        "items": manifest["num_items"],
        "dim": manifest["embedding_dim"],
        "index": manifest["index"],
        "index_recall_at_10": manifest["index_recall"]["recall"],
        "scan_floor_ms": floor_ms,
        **in_process(artifact, retriever_users),
    }
    process, url = start_server(artifact)
    try:
        requests = requests_for(retriever_users)
        result["http"] = [load_test(url, requests, c, seconds) for c in levels]
        result["service_rss_mib"] = rss_mib(process.pid)
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=60)
    return result


def _known_users(artifact: Path) -> list:
    import pyarrow.parquet as pq

    return pq.read_table(artifact / "queries.parquet", columns=["user_id"]).column(0).to_pylist()


def markdown(results: list[dict], bandwidth: float) -> str:
    lines = [
        f"Streaming read bandwidth: {bandwidth / 1e9:.1f} GB/s.",
        "",
        "| N | index | recall@10 | scan floor | search (1) | search (per query of 32) "
        "| retrieve (1) | C | req/s | p50 | p99 | errors | mean batch | RSS |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        for h in r["http"]:
            lines.append(
                f"| {r['items']:,} | {r['index']} | {r['index_recall_at_10']:.3f} "
                f"| {r['scan_floor_ms']:.2f} ms | {r['search_1_ms']:.2f} ms "
                f"| {r['search_32_per_query_ms']:.2f} ms | {r['retrieve_1_ms']:.2f} ms "
                f"| {h['connections']} | {h['requests_per_s']:,.0f} | {h['p50_ms']:.1f} ms "
                f"| {h['p99_ms']:.1f} ms | {h['errors']} | {h['mean_batch']:.1f} "
                f"| {r['service_rss_mib']:,.0f} MiB |"
            )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("runs/serving"))
    parser.add_argument("--items", default="100000,1000000")
    parser.add_argument("--indexes", default="exact,hnsw")
    parser.add_argument("--concurrency", default="1,8,32")
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument(
        "--build-only", action="store_true", help="Train and export the artifacts, measure nothing."
    )
    args = parser.parse_args()
    kinds = args.indexes.split(",")
    levels = [int(c) for c in args.concurrency.split(",")]
    bandwidth = read_bandwidth()
    print(f"read bandwidth {bandwidth / 1e9:.1f} GB/s", flush=True)
    results = []
    for num_items in (int(n) for n in args.items.split(",")):
        print(f"N = {num_items}", flush=True)
        artifacts = build(args.out, num_items, kinds)
        if args.build_only:
            continue
        for artifact in artifacts.values():
            dim = json.loads((artifact / "manifest.json").read_text())["embedding_dim"]
            floor_ms = 1000 * num_items * dim * 4 / bandwidth
            result = measure(artifact, levels, args.duration, floor_ms)
            print(json.dumps(result), flush=True)
            results.append(result)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "serving.json").write_text(json.dumps(results, indent=2))
    table = markdown(results, bandwidth)
    (args.out / "serving.md").write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
