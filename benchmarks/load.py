"""The service under sustained load, with reloads: errors, latency and memory over time.

    python benchmarks/load.py --out runs/load [--items 100000] [--connections 64]
        [--duration 120] [--reload-every 5] [--events-per-second 0]
        [--state redis://HOST:PORT/DB] [--quick]

Builds (or reuses) the artifact that ``benchmarks/serving.py`` builds for N items (exact
index), starts ``twotower serve`` on it in its own process with an admin token, and
keeps C keep-alive connections busy with ``POST /recall`` of random known users (k = 10,
seen items excluded) for ``--duration`` seconds after a 2 s warm-up. Meanwhile it
reloads the artifact (``POST /admin/reload``) every ``--reload-every`` seconds and
samples the service's resident memory every 0.5 s. With ``--events-per-second N`` it
also sends ``POST /events`` on a connection of its own, N a second on a fixed schedule,
each one interaction of a random known user with a random item (the service's clock
as its time), with the admin token; an answer 200 counts the event as acknowledged,
anything else (or a broken connection, or a timeout) as failed. ``--state URL`` loads
the artifact's users into that Redis (``twotower state load``) and serves with
``--state URL``, so recalls read their users' states from Redis and events go there.

Every request counts: a status other than 200, a broken connection or a timeout is
an error (the connection is then opened again). Per second of the run it records
requests, errors, events, latency p50/p99 and the service's memory, and reports the totals,
the overall percentiles, how the per-second p99 spreads, and the mean memory of the
first, middle and last tenth of the run (the first reloads raise it once, while two
artifacts briefly coexist; a leak would go on raising it through the second half).

Writes ``load.json`` (the totals and the per-second series), ``load.md`` and
``load.png`` (requests/s, latency and memory over time, reloads marked) into --out.
``--quick``: 5,000 items, 16 connections, 6 s, a reload every 1.5 s.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from serving import (  # noqa: E402
    _known_users,
    build,
    exchange,
    requests_for,
    rss_mib,
    start_server,
)

TIMEOUT_S = 10.0


async def _send(host, port, connection, request) -> tuple:
    """Sends ``request`` on ``connection`` (opened first when None); returns the
    connection to go on with (None after any failure) and whether the answer was 200."""
    try:
        if connection is None:
            connection = await asyncio.open_connection(host, port)
        status = await asyncio.wait_for(exchange(*connection, request), TIMEOUT_S)
        return connection, b" 200 " in status
    except (OSError, asyncio.IncompleteReadError, asyncio.TimeoutError, ValueError):
        if connection is not None:
            connection[1].close()
        return None, False


async def _connection(host, port, requests, offset, until, log) -> None:
    """One client connection: requests back to back until ``until``; appends
    (finish time, latency s, ok) to ``log``; reconnects after any failure."""
    i, connection = offset, None
    while time.perf_counter() < until:
        clock = time.perf_counter()
        connection, ok = await _send(host, port, connection, requests[i % len(requests)])
        i += 1
        now = time.perf_counter()
        log.append((now, now - clock, ok))
    if connection is not None:
        connection[1].close()


async def _reloader(host, port, token, every, until, log) -> None:
    """POST /admin/reload every ``every`` seconds; appends (time, status) to ``log``."""
    request = (
        f"POST /admin/reload HTTP/1.1\r\nHost: bench\r\nAuthorization: Bearer {token}\r\n"
        "Content-Length: 0\r\n\r\n"
    ).encode()
    while time.perf_counter() + every < until:
        await asyncio.sleep(every)
        try:
            reader, writer = await asyncio.open_connection(host, port)
            status = await asyncio.wait_for(exchange(reader, writer, request), 120)
            writer.close()
            log.append((time.perf_counter(), int(status.split()[1])))
        except (OSError, asyncio.IncompleteReadError, asyncio.TimeoutError) as err:
            log.append((time.perf_counter(), f"failed: {err!r}"))


async def _events(host, port, requests, per_second, until, log) -> None:
    """POST /events ``per_second`` times a second on one connection, on a schedule (a
    slow answer delays the next ones, which then go at once); appends (finish time,
    latency s, ok) to ``log``; reconnects after any failure."""
    start, sent, connection = time.perf_counter(), 0, None
    while (due := start + sent / per_second) < until:
        await asyncio.sleep(max(0.0, due - time.perf_counter()))
        clock = time.perf_counter()
        connection, ok = await _send(host, port, connection, requests[sent % len(requests)])
        sent += 1
        now = time.perf_counter()
        log.append((now, now - clock, ok))
    if connection is not None:
        connection[1].close()


def events_for(users: list, items: list, token: str, count: int = 512) -> list[bytes]:
    """``count`` POST /events requests, each one event of a random user and item."""
    rng = np.random.default_rng(2)
    out = []
    for user, item in zip(rng.choice(users, count), rng.choice(items, count), strict=True):
        event = {"user": int(user), "item": int(item)}
        body = json.dumps({"events": [event]}).encode()
        head = (
            f"POST /events HTTP/1.1\r\nHost: bench\r\nAuthorization: Bearer {token}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
        )
        out.append(head.encode() + body)
    return out


def load_users(artifact: Path, url: str) -> None:
    """``twotower state load``: the artifact's users into the Redis at ``url``."""
    command = [sys.executable, "-m", "twotower", "state", "load", str(artifact), "--redis", url]
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)


def _without_password(url: str) -> str:
    scheme, _, rest = url.partition("://")
    return f"{scheme}://{rest.rpartition('@')[2]}"


def _known_items(artifact: Path) -> list:
    import pyarrow.parquet as pq

    key = json.loads((artifact / "manifest.json").read_text())["item_key"]
    return pq.read_table(artifact / "items.parquet", columns=[key]).column(0).to_pylist()


async def _memory(pid, until, log) -> None:
    while time.perf_counter() < until:
        log.append((time.perf_counter(), rss_mib(pid)))
        await asyncio.sleep(0.5)


async def _run(url, requests, connections, seconds, pid, token, every, events, rate) -> dict:
    host, port = url.removeprefix("http://").rsplit(":", 1)
    port = int(port)
    # events begin with the measured run, after the warm-up
    warm: list = []
    warm_until = time.perf_counter() + 2.0
    await asyncio.gather(
        *[_connection(host, port, requests, 97 * c, warm_until, warm) for c in range(connections)]
    )
    start = time.perf_counter()
    until = start + seconds
    requests_log, reloads, memory, events_log = [], [], [], []
    await asyncio.gather(
        *[
            _connection(host, port, requests, 97 * c, until, requests_log)
            for c in range(connections)
        ],
        _reloader(host, port, token, every, until, reloads),
        _memory(pid, until, memory),
        *([_events(host, port, events, rate, until, events_log)] if rate > 0 else []),
    )
    return {
        "start": start,
        "requests": requests_log,
        "reloads": reloads,
        "memory": memory,
        "events": events_log,
        "warm_up_errors": sum(not ok for _, _, ok in warm),
    }


def summarize(raw: dict, seconds: float) -> dict:
    start = raw["start"]
    done = np.array([t - start for t, _, _ in raw["requests"]])
    latency = np.array([s for _, s, _ in raw["requests"]]) * 1000
    ok = np.array([k for _, _, k in raw["requests"]], dtype=bool)
    second = np.minimum(done.astype(int), int(seconds) - 1)
    memory_t = np.array([t - start for t, _ in raw["memory"]])
    memory = np.array([m for _, m in raw["memory"]])
    series = []
    for s in range(int(seconds)):
        mask = second == s
        in_window = (memory_t >= s) & (memory_t < s + 1)
        series.append(
            {
                "second": s,
                "requests": int(mask.sum()),
                "errors": int((~ok[mask]).sum()),
                "p50_ms": float(np.percentile(latency[mask], 50)) if mask.any() else None,
                "p99_ms": float(np.percentile(latency[mask], 99)) if mask.any() else None,
                "rss_mib": float(memory[in_window].max()) if in_window.any() else None,
            }
        )
    tenth, half = max(1, len(memory) // 10), len(memory) // 2
    window_p99 = [w["p99_ms"] for w in series if w["p99_ms"] is not None]
    reload_ok = [r for r in raw["reloads"] if r[1] == 200]
    return {
        "requests": int(len(latency)),
        "errors": int((~ok).sum()),
        "warm_up_errors": raw["warm_up_errors"],
        "requests_per_s": len(latency) / seconds,
        "p50_ms": float(np.percentile(latency, 50)),
        "p99_ms": float(np.percentile(latency, 99)),
        "p999_ms": float(np.percentile(latency, 99.9)),
        "max_ms": float(latency.max()),
        "window_p99_median_ms": statistics.median(window_p99),
        "window_p99_max_ms": max(window_p99),
        "reloads": len(raw["reloads"]),
        "reloads_ok": len(reload_ok),
        "reload_results": [r[1] for r in raw["reloads"]],
        "reload_seconds": [r[0] - start for r in raw["reloads"]],
        "rss_first_tenth_mib": float(memory[:tenth].mean()),
        "rss_last_tenth_mib": float(memory[-tenth:].mean()),
        "rss_max_mib": float(memory.max()),
        "rss_middle_tenth_mib": float(memory[half - tenth // 2 : half + tenth - tenth // 2].mean()),
        "rss_growth_second_half_mib": float(
            memory[-tenth:].mean() - memory[half - tenth // 2 : half + tenth - tenth // 2].mean()
        ),
        **_events_summary(raw["events"], start, seconds, series),
        "series": series,
    }


def _events_summary(log: list, start: float, seconds: float, series: list[dict]) -> dict:
    """The events' totals and latency; adds each second's events and failures to
    ``series``."""
    done = np.array([t - start for t, _, _ in log])
    ok = np.array([k for _, _, k in log], dtype=bool)
    second = np.minimum(done.astype(int), int(seconds) - 1)
    for window in series:
        mask = second == window["second"]
        window["events"], window["event_failures"] = int(mask.sum()), int((~ok[mask]).sum())
    latency = np.array([s for _, s, _ in log]) * 1000
    return {
        "events": len(log),
        "events_acknowledged": int(ok.sum()),
        "events_failed": int((~ok).sum()),
        "events_per_s": len(log) / seconds,
        "events_p50_ms": float(np.percentile(latency, 50)) if len(log) else None,
        "events_p99_ms": float(np.percentile(latency, 99)) if len(log) else None,
    }


def markdown(result: dict) -> str:
    r = result["summary"]
    events = "-"
    if r["events"]:
        events = (
            f"{r['events_acknowledged']:,} / {r['events_failed']} "
            f"({r['events_p50_ms']:.1f} / {r['events_p99_ms']:.1f} ms)"
        )
    return "\n".join(
        [
            f"{result['items']:,} items, {result['index']} index, {result['connections']} "
            f"connections, {result['duration']:.0f} s, a reload every "
            f"{result['reload_every']:g} s, {result['events_per_second']:g} events/s, "
            f"users' states in {result['state']}; {result['machine']}.",
            "",
            "| requests | errors | req/s | p50 | p99 | p99.9 | max | per-second p99: median "
            "/ worst | reloads (ok) | memory: first, middle and last tenth (max) "
            "| events: acknowledged / failed (p50 / p99) |",
            "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
            f"| {r['requests']:,} | {r['errors']} | {r['requests_per_s']:,.0f} "
            f"| {r['p50_ms']:.1f} ms | {r['p99_ms']:.1f} ms | {r['p999_ms']:.1f} ms "
            f"| {r['max_ms']:.0f} ms | {r['window_p99_median_ms']:.1f} / "
            f"{r['window_p99_max_ms']:.1f} ms | {r['reloads']} ({r['reloads_ok']}) "
            f"| {r['rss_first_tenth_mib']:,.0f}, {r['rss_middle_tenth_mib']:,.0f}, "
            f"{r['rss_last_tenth_mib']:,.0f} MiB ({r['rss_max_mib']:,.0f}) | {events} |",
        ]
    )


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = result["summary"]["series"]
    t = [w["second"] + 0.5 for w in series]
    fig, axes = plt.subplots(3, 1, figsize=(8, 7), sharex=True)
    axes[0].plot(t, [w["requests"] for w in series], label="requests/s")
    axes[0].plot(t, [w["errors"] for w in series], color="red", label="errors/s")
    if result["summary"]["events"]:
        axes[0].plot(t, [w["events"] for w in series], label="events/s")
        axes[0].plot(t, [w["event_failures"] for w in series], label="failed events/s")
    axes[1].plot(t, [w["p50_ms"] for w in series], label="p50")
    axes[1].plot(t, [w["p99_ms"] for w in series], label="p99")
    axes[2].plot(t, [w["rss_mib"] for w in series], label="service RSS (MiB)")
    axes[0].set_ylabel("per second")
    axes[1].set_ylabel("latency (ms)")
    axes[2].set_ylabel("MiB")
    axes[2].set_xlabel("seconds into the run")
    for ax in axes:
        for moment in result["summary"]["reload_seconds"]:
            ax.axvline(moment, color="gray", linewidth=0.6, linestyle=":")
        ax.legend(loc="upper right")
    what = "POST /recall" + (" and /events" if result["summary"]["events"] else "")
    axes[0].set_title(f"{what} under load; dotted lines: artifact reloads")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("runs/load"))
    parser.add_argument("--items", type=int, default=100_000)
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--duration", type=float, default=120.0)
    parser.add_argument("--reload-every", type=float, default=5.0)
    parser.add_argument("--events-per-second", type=float, default=0.0)
    parser.add_argument("--state", help="serve users' states from this Redis URL")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    if args.quick:
        args.items, args.connections, args.duration, args.reload_every = 5_000, 16, 6.0, 1.5
    artifact = build(args.out, args.items, ["exact"])["exact"]
    token = secrets.token_hex(16)
    token_file = args.out / "admin-token"
    token_file.write_text(token + "\n")
    token_file.chmod(0o600)
    options = ["--admin-token-file", str(token_file)]
    if args.state:
        load_users(artifact, args.state)
        options += ["--state", args.state]
    process, url = start_server(artifact, options)
    try:
        users = _known_users(artifact)
        raw = asyncio.run(
            _run(
                url,
                requests_for(users),
                args.connections,
                args.duration,
                process.pid,
                token,
                args.reload_every,
                events_for(users, _known_items(artifact), token),
                args.events_per_second,
            )
        )
        alive = process.poll() is None
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=60)
    manifest = json.loads((artifact / "manifest.json").read_text())
    result = {
        "machine": f"{os.cpu_count()} CPU cores, client and service on the same machine",
        "items": manifest["num_items"],
        "index": manifest["index"],
        "connections": args.connections,
        "duration": args.duration,
        "reload_every": args.reload_every,
        "events_per_second": args.events_per_second,
        "state": "memory" if args.state is None else _without_password(args.state),
        "service_alive_at_end": alive,
        "summary": summarize(raw, args.duration),
    }
    (args.out / "load.json").write_text(json.dumps(result, indent=2))
    table = markdown(result)
    (args.out / "load.md").write_text(table + "\n")
    plot(result, args.out / "load.png")
    print(table)


if __name__ == "__main__":
    main()
