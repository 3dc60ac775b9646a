"""Users' states in the service's memory or in Redis, at 100,000 and 1,000,000 users:
the service's start and memory, Redis's own, and what a request pays for the store.

    python benchmarks/state_scale.py --out runs/state-scale [--sizes 2000000,20000000]
        [--items 1000000] [--starts 3] [--rates 100,200] [--repeats 3] [--duration 8]
        [--serve-option=--threads=1] [--quick]

For each size (interactions, about 20 per user: 100,000 and 1,000,000 users over the
same ``--items`` items) the artifact is made as ``benchmarks/scale.py`` makes it, in
the same folders (``OUT/rows-N``, whose finished stages either script reuses): raw
logs, the DuckDB build, one training process, ``export --index auto``. Then:

1. A fresh ``redis-server`` on a free port, its files in a temporary folder, with the
   persistence docs/serving.md recommends (AOF, fsync always), is filled by
   ``twotower state load``: its seconds and Redis's own ``INFO memory`` (used_memory).
2. ``twotower serve ARTIFACT`` (users in the service's memory) and ``twotower serve
   ARTIFACT --state redis://...`` are each started ``--starts`` times: the seconds from
   the command to ``GET /ready`` answering 200, and the service's resident memory then
   (RSS, and its anonymous part: what is not mapped from files). The last service of
   each stays up; 50 known users' answers are compared (same items, scores within 1e-4).
3. Open loop, as ``benchmarks/openloop.py`` measures it (``wrk``, 32 connections, each
   request's latency counted from when it was due): random known users (k = 10) at
   each ``--rates`` rate for ``--duration`` s, the two services taken in turn,
   ``--repeats`` times; p50 / p90 / p99 medians per store, and the mean micro-batch
   duration from each service's ``/metrics``. With Redis every known user's vector is
   computed from the state read for that batch; the memory store keeps the artifact's
   users' model inputs from load. So the difference is the round trip plus that state
   path.
4. The store's read alone: ``RedisStore.read`` of 1, 16, 64 and 256 random users
   (median of 50).

Writes ``state-scale.json``, ``state-scale.md`` and ``state-scale.png`` in --out.
``--quick``: 20,000 and 60,000 interactions over 5,000 items, 20 training steps, one
start each, one repeat of 2 s at 50 requests/s. ``--rates=`` (empty) skips step 3.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import scale  # noqa: E402
from openloop import bodies, offer  # noqa: E402

STORES = ("memory", "redis")
MEMORY_KEYS = ("seconds", "rss_mib", "anon_mib")
READS = (1, 16, 64, 256)  # users per RedisStore.read (a micro-batch holds up to 256)
LATENCY_KEYS = ("p50_ms", "p90_ms", "p99_ms", "batch_ms", "mean_batch", "achieved_per_s")
ROOT = Path(__file__).resolve().parent.parent


@contextlib.contextmanager
def redis_server(folder: Path, prefix: list[str] = ()) -> Iterator[str]:
    """A fresh ``redis-server`` on a free loopback port with its files in ``folder``
    (append-only file, fsync always), ``prefix`` before the command (``taskset -c 1``);
    yields its URL, stops it on exit."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    command = [*prefix, shutil.which("redis-server"), "--port", str(port), "--bind", "127.0.0.1"]
    command += ["--dir", str(folder), "--appendonly", "yes", "--appendfsync", "always"]
    command += ["--save", "", "--logfile", "redis.log"]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"redis://127.0.0.1:{port}/0"
    try:
        deadline = time.monotonic() + 30
        while not _pong(port):
            if process.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"redis-server did not start; see {folder / 'redis.log'}")
            time.sleep(0.05)
        yield url
    finally:
        process.terminate()
        process.wait(timeout=120)


def _pong(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(64).startswith(b"+PONG")
    except OSError:
        return False


def load_users(artifact: Path, url: str, log: Path) -> dict:
    """``twotower state load``: its seconds and peak memory, users written, and what
    Redis holds afterwards."""
    import redis

    command = scale.twotower("state", "load", str(artifact), "--redis", url)
    seconds, peak, status = scale.run_measured(command, log)
    if status:
        raise SystemExit(f"state load failed; see {log}")
    loaded = int(re.search(r"Loaded (\d+) users", log.read_text()).group(1))
    client = redis.Redis.from_url(url)
    memory, persistence = client.info("memory"), client.info("persistence")
    keys = client.dbsize()
    client.close()
    return {
        "seconds": round(seconds, 1),
        "loader_peak_rss_mib": round(peak),
        "users": loaded,
        "keys": keys,
        "used_memory_mib": round(memory["used_memory"] / 2**20),
        "used_memory_rss_mib": round(memory["used_memory_rss"] / 2**20),
        "aof_mib": round(persistence.get("aof_current_size", 0) / 2**20),
    }


def start_service(
    artifact: Path, options: list[str], log: Path
) -> tuple[subprocess.Popen, str, float]:
    """``twotower serve`` on a free port; returns it, its URL and the seconds from the
    command until ``/ready`` answered 200."""
    command = scale.twotower("serve", str(artifact), "--port", "0", *options)
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "PYTHONUNBUFFERED": "1"}
    clock = time.perf_counter()
    with log.open("wb") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env)
    deadline, url = time.monotonic() + 900, None
    while time.monotonic() < deadline and process.poll() is None:
        found = url or re.search(r"^Serving .* on (http://\S+) ", log.read_text(), re.M)
        url = found if isinstance(found, str) else found and found.group(1)
        if url and _ready(url):
            return process, url, time.perf_counter() - clock
        time.sleep(0.05)
    process.kill()
    raise SystemExit(f"the service did not become ready; see {log}")


def _ready(url: str) -> bool:
    try:
        return urllib.request.urlopen(f"{url}/ready", timeout=5).status == 200
    except (urllib.error.URLError, OSError):
        return False


def memory_of(pid: int) -> dict:
    """The process's resident memory and its anonymous part (not file-backed), in MiB."""
    status = Path(f"/proc/{pid}/status").read_text()

    def mib(field: str) -> int:
        return round(int(re.search(rf"^{field}:\s+(\d+) kB", status, re.M).group(1)) / 1024)

    return {"rss_mib": mib("VmRSS"), "anon_mib": mib("RssAnon")}


def stop(process: subprocess.Popen) -> None:
    process.send_signal(signal.SIGTERM)
    process.wait(timeout=120)


def starts(artifact: Path, options: list[str], count: int, log: Path) -> tuple[list, Path, str]:
    """Starts the service ``count`` times (each stopped before the next); returns each
    start's seconds and memory, and the last one, left running, with its URL."""
    records = []
    for attempt in range(count):
        process, url, seconds = start_service(artifact, options, log)
        records.append({"seconds": round(seconds, 2), **memory_of(process.pid)})
        print(f"    start {attempt + 1}: {records[-1]}", flush=True)
        if attempt < count - 1:
            stop(process)
    return records, process, url


def recall(url: str, body: str) -> dict:
    request = urllib.request.Request(
        f"{url}/recall", body.encode(), {"Content-Type": "application/json"}
    )
    return json.loads(urllib.request.urlopen(request, timeout=30).read())


def answers_agree(urls: dict[str, str], lines: list[str]) -> bool:
    """Whether both services give every body the same items, scores within 1e-4."""
    for body in lines:
        memory, redis = (recall(urls[store], body) for store in STORES)
        scores = memory["scores"], redis["scores"]
        same = memory["items"] == redis["items"]
        if not same or any(abs(a - b) > 1e-4 for a, b in zip(*scores, strict=True)):
            print(f"    answers differ for {body}: {memory} against {redis}", flush=True)
            return False
    return True


def batch_totals(url: str) -> tuple[float, float, float]:
    """(seconds in micro-batches, batches, queries) so far, from the service's /metrics."""
    text = urllib.request.urlopen(f"{url}/metrics", timeout=30).read().decode()

    def value(name: str) -> float:
        return float(re.search(rf"^{name} (\S+)", text, re.M).group(1))

    return (
        value("twotower_batch_duration_seconds_sum"),
        value("twotower_batch_duration_seconds_count"),
        value("twotower_batch_queries_sum"),
    )


def open_loop(args, urls: dict[str, str], lines: Path) -> list[dict]:
    """Each rate on each store, the stores in turn (their order alternating), repeated."""
    for url in urls.values():
        offer(url, args.rates[0], 3.0, args.connections, lines)  # warm-up
    runs = []
    for repeat in range(args.repeats):
        for rate in args.rates:
            for store in STORES if repeat % 2 == 0 else STORES[::-1]:
                before = batch_totals(urls[store])
                result = offer(urls[store], rate, args.duration, args.connections, lines)
                seconds, batches, queries = (
                    b - a for a, b in zip(before, batch_totals(urls[store]), strict=True)
                )
                result.update(
                    store=store,
                    repeat=repeat,
                    batch_ms=round(1000 * seconds / max(batches, 1), 3),
                    mean_batch=round(queries / max(batches, 1), 2),
                )
                runs.append(result)
                print(
                    f"    {store:6} {rate}/s: p50 {result['p50_ms']:.2f} p90 "
                    f"{result['p90_ms']:.2f} p99 {result['p99_ms']:.2f} ms, batch "
                    f"{result['batch_ms']:.2f} ms ({result['mean_batch']:.1f} queries), "
                    f"errors {result['non_2xx'] + result['socket_errors']}",
                    flush=True,
                )
    return runs


def store_reads(url: str, artifact: Path, sizes=READS, repeats: int = 50) -> dict:
    """Median milliseconds of one ``RedisStore.read`` of ``size`` random known users."""
    import numpy as np

    from twotower.serving.stores.redis_store import RedisStore

    users = [json.loads(line)["user_id"] for line in bodies(artifact, "known", 2000, seed=2)]
    store, rng, result = RedisStore(url), np.random.default_rng(0), {}
    for size in sizes:
        times = []
        for _ in range(repeats + 1):
            batch = [users[i] for i in rng.choice(len(users), size)]
            clock = time.perf_counter()
            store.read(batch)
            times.append(time.perf_counter() - clock)
        result[f"read_{size}_ms"] = round(1000 * statistics.median(times[1:]), 3)
    store.close()
    return result


def one_size(args, rows: int) -> dict:
    """The artifact of ``rows`` interactions, then every step of the module doc."""
    import pyarrow.parquet as pq

    folder, stages = scale.size_folder(args.out, rows)
    scale.synth_raw(args, folder, stages)
    scale.build_raw(args, folder, stages, "duckdb")
    scale.train_built(args, folder, stages, 1)
    artifact = scale.export_artifact(folder, stages)
    users = pq.ParquetFile(artifact / "queries.parquet").metadata.num_rows
    result: dict = {"rows": rows, "users": users, "load_average_before": os.getloadavg()}
    print(f"  {users:,} users: loading Redis", flush=True)
    options = {"memory": args.serve_option, "redis": [*args.serve_option, "--state"]}
    services: dict[str, tuple[subprocess.Popen, str]] = {}
    with tempfile.TemporaryDirectory() as files, redis_server(Path(files)) as redis_url:
        result["redis_load"] = load_users(artifact, redis_url, folder / "state-load.log")
        print(f"    {result['redis_load']}", flush=True)
        options["redis"].append(redis_url)
        try:
            for store in STORES:
                print(f"  starting the service, {store} store", flush=True)
                log = folder / f"serve-{store}.log"
                records, process, url = starts(artifact, options[store], args.starts, log)
                services[store] = (process, url)
                result[store] = {"starts": records}
            urls = {store: url for store, (_, url) in services.items()}
            result["answers_agree"] = answers_agree(urls, bodies(artifact, "known", 50, seed=3))
            print(f"  answers agree: {result['answers_agree']}", flush=True)
            if args.rates:
                with tempfile.NamedTemporaryFile("w", suffix=".jsonl") as lines:
                    lines.write("\n".join(bodies(artifact, "known")) + "\n")
                    lines.flush()
                    result["open_loop"] = open_loop(args, urls, Path(lines.name))
            for store, (process, _) in services.items():
                result[store]["after_requests"] = memory_of(process.pid)
            result["store_reads"] = store_reads(redis_url, artifact)
        finally:
            for process, _ in services.values():
                stop(process)
    result["load_average_after"] = os.getloadavg()
    return result


def medians(result: dict) -> dict:
    """``start``: per store, the median start seconds and memory; ``latency``: per rate,
    each store's median percentiles and micro-batch time, and Redis's minus memory's."""
    starts_ = {store: result[store]["starts"] for store in STORES}
    start = {
        store: {key: statistics.median(s[key] for s in runs) for key in MEMORY_KEYS}
        for store, runs in starts_.items()
    }
    latency = []
    for rate in sorted({run["offered_per_s"] for run in result.get("open_loop", [])}):
        runs = [run for run in result["open_loop"] if run["offered_per_s"] == rate]
        row: dict = {"rate": rate}
        for store in STORES:
            mine = [run for run in runs if run["store"] == store]
            row[store] = {key: statistics.median(r[key] for r in mine) for key in LATENCY_KEYS}
        row["difference"] = {
            key: round(row["redis"][key] - row["memory"][key], 3) for key in LATENCY_KEYS
        }
        latency.append(row)
    return {"start": start, "latency": latency}


def markdown(results: dict) -> str:
    lines = [
        "| users | `state load` | Redis `used_memory` | memory store: start, RSS (anonymous) "
        "| Redis store: start, RSS (anonymous) | answers agree |",
        "|---:|---:|---:|---:|---:|:---:|",
    ]
    for r in results["sizes"]:
        load, cells = r["redis_load"], []
        for store in STORES:
            m = r["medians"]["start"][store]
            cells.append(f"{m['seconds']:.1f} s, {m['rss_mib']:,.0f} ({m['anon_mib']:,.0f}) MiB")
        lines.append(
            f"| {r['users']:,} | {load['seconds']:,.0f} s | {load['used_memory_mib']:,} MiB "
            f"| {' | '.join(cells)} | {'yes' if r['answers_agree'] else 'no'} |"
        )
    lines += [
        "",
        "| users | offered/s | memory p50 / p90 / p99 | Redis p50 / p90 / p99 "
        "| difference p50 / p90 / p99 | micro-batch: memory / Redis (queries) |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results["sizes"]:
        for row in r["medians"]["latency"]:
            cells = [
                " / ".join(f"{row[s][p]:.1f}" for p in ("p50_ms", "p90_ms", "p99_ms"))
                for s in (*STORES, "difference")
            ]
            batch = " / ".join(f"{row[s]['batch_ms']:.2f}" for s in STORES)
            lines.append(
                f"| {r['users']:,} | {row['rate']:,} | {' ms | '.join(cells)} ms | {batch} ms "
                f"({row['redis']['mean_batch']:.1f}) |"
            )
    lines += ["", "| users | `RedisStore.read`: 1 user | 16 users | 64 users | 256 users |"]
    lines.append("|---:|---:|---:|---:|---:|")
    for r in results["sizes"]:
        reads = [f"{r['store_reads'][f'read_{n}_ms']:.2f} ms" for n in READS]
        lines.append(f"| {r['users']:,} | {' | '.join(reads)} |")
    return "\n".join(lines) + "\n"


def plot(results: dict, path: Path) -> None:
    """The service's start and memory by users, per store (Redis's own memory beside)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = results["sizes"]
    users = [r["users"] for r in sizes]
    figure, (start, memory) = plt.subplots(1, 2, figsize=(10, 4))
    for store, label in (("memory", "users in the service"), ("redis", "users in Redis")):
        start.plot(
            users, [r["medians"]["start"][store]["seconds"] for r in sizes], marker="o", label=label
        )
        memory.plot(
            users, [r["medians"]["start"][store]["rss_mib"] for r in sizes], marker="o", label=label
        )
    used = [r["redis_load"]["used_memory_mib"] for r in sizes]
    memory.plot(users, used, marker="s", linestyle="--", label="Redis's used_memory")
    start.set(xscale="log", xlabel="users", ylabel="seconds to /ready", title="service start")
    memory.set(xscale="log", xlabel="users", ylabel="MiB", title="service resident memory")
    for axis in (start, memory):
        axis.set_ylim(bottom=0)
        axis.legend()
    figure.suptitle(f"{results['items']:,} items")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("runs/state-scale"))
    parser.add_argument("--sizes", default=None, help="default 2000000,20000000")
    parser.add_argument("--items", type=int, default=1_000_000)
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--memory-limit", default="2GB")
    parser.add_argument("--starts", type=int, default=3)
    parser.add_argument("--rates", default=None, help="default 100,200 (--quick: 50)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--duration", type=float, default=8.0)
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument(
        "--serve-option", action="append", default=[], help="passed to both twotower serve"
    )
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    sizes = args.sizes or ("20000,60000" if args.quick else "2000000,20000000")
    if args.quick:
        args.items, args.steps, args.starts = 5_000, 20, 1
        args.repeats, args.duration = 1, 2.0
        args.rates = "50" if args.rates is None else args.rates
    rates = "100,200" if args.rates is None else args.rates
    args.rates = [int(r) for r in rates.split(",") if r]
    if shutil.which("redis-server") is None:
        raise SystemExit("redis-server is not installed: apt-get install redis-server")
    if args.rates and shutil.which("wrk") is None:
        raise SystemExit("wrk is not installed: apt-get install wrk (or --rates= to skip)")
    args.out.mkdir(parents=True, exist_ok=True)
    results: dict = {"machine": f"{os.cpu_count()} CPU cores", "items": args.items, "sizes": []}
    results.update(serve_options=args.serve_option, rates=args.rates, repeats=args.repeats)
    for rows in (int(s) for s in sizes.split(",")):
        print(f"{rows:,} interactions, {args.items:,} items", flush=True)
        result = one_size(args, rows)
        result["medians"] = medians(result)
        results["sizes"].append(result)
        (args.out / "state-scale.json").write_text(json.dumps(results, indent=2))
    (args.out / "state-scale.md").write_text(markdown(results))
    plot(results, args.out / "state-scale.png")
    print(markdown(results))


if __name__ == "__main__":
    main()
