"""Open-loop latency of ``POST /recall``: requests at fixed rates, whatever the service
answers, from ``wrk`` (a native load generator; Debian's ``apt-get install wrk``).

    python benchmarks/openloop.py --out runs/openloop [--items 100000,1000000]
        [--rates 250,500,1000,2000] [--duration 10] [--connections 32]
        [--bodies floor,known,history,cold] [--serve-option=--threads=1] [--pin 1:0] [--redis]
    python benchmarks/openloop.py --compare LEDGER.jsonl ...   # their rows side by side

For each corpus size N the artifact of ``benchmarks/serving.py`` (5,000 synthetic users,
N items, HNSW index; built once in ``--out`` and reused), or each folder of
``--artifacts``, is served by ``twotower serve`` in its own process, and
``benchmarks/openloop.lua`` drives it: C keep-alive connections, each sending on a fixed
schedule so that together they offer the rate, and each request's latency counted from
when it was due (a slow answer delays the requests behind it, and that delay is
counted, not hidden). Three kinds of request bodies: a known user (``{"user_id": ...,
"k": 10}``: stored features and history, seen items excluded), a known user with a
request-time history (``"history"``: its stored recent items and two more, as if they
had just happened, so the query tower runs on them) and a cold-start feature row
(``{"features": {...}, "k": 10}``: a known user's raw feature columns sent as a new
user's). After the given rates the rate doubles until the service saturates: it
answers under 90% of the offered rate, or its p99 passes a second. A fourth kind,
``floor``, offers the given rates of known users' bodies to ``floor_app.py``, a bare
uvicorn app on the service's CPUs that answers a fixed JSON: the harness's own
latency in that hour, beside which the service's rows are read. ``--pin 1:0`` runs
the service (and its Redis) on CPU 1 and wrk on CPU 0 (``taskset``); ``--redis`` keeps
the users' states in a ``redis-server`` of its own, filled by ``twotower state load``.

Per N, body kind and rate: p50 / p90 / p99 / p99.9 / max, requests sent and answered,
non-2xx answers and socket errors, the achieved rate; the saturation rate is the highest
achieved. Each finished measurement is appended to ``OUT/openloop.jsonl`` (a rerun skips
what is there); ``OUT/openloop.md`` is the table, ``OUT/openloop.png`` the curves.

The load generator and the service share this machine's cores: on a 2-core machine the
figures are a floor for what a separate client machine would see.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serving import build, launch, rss_mib, start_server  # noqa: E402

SCRIPT = Path(__file__).resolve().parent / "openloop.lua"
FLOOR_APP = Path(__file__).resolve().parent / "floor_app.py"
FLOOR = "floor"  # the body kind that measures the bare app at the same rates
K = 10
SATURATED_P99_MS = 1000.0


def bodies(artifact: Path, kind: str, count: int = 2000, seed: int = 1) -> list[str]:
    """``count`` request bodies of one kind for random known users of ``artifact``."""
    table = pq.read_table(artifact / "queries.parquet")
    manifest = json.loads((artifact / "manifest.json").read_text())
    key = manifest["query_key"]
    rows = np.random.default_rng(seed).choice(table.num_rows, count)
    picked = table.take(rows).to_pylist()
    if kind == "known":
        return [json.dumps({"user_id": row[key], "k": K}) for row in picked]
    if kind == "history":  # the latest items arrive with the request: the tower runs on them
        with np.load(artifact / "recent.npz", allow_pickle=False) as recent:
            indptr, recent_rows = recent["indptr"], recent["rows"]
        items = pq.read_table(artifact / "items.parquet", columns=[manifest["item_key"]])
        item_ids = items.column(0).to_numpy()
        latest = np.random.default_rng(seed + 1).choice(len(item_ids), (count, 2))
        out = []
        for row, user, new in zip(rows, picked, latest, strict=True):
            stored = recent_rows[indptr[row] : indptr[row + 1]][::-1]  # oldest first
            history = item_ids[np.concatenate([stored, new])].tolist()
            out.append(json.dumps({"user_id": user[key], "history": history, "k": K}))
        return out
    if kind == "cold":
        lists = {f.name for f in table.schema if f.type.num_fields}  # histories
        features = [{c: v for c, v in row.items() if c != key and c not in lists} for row in picked]
        return [json.dumps({"features": row, "k": K}) for row in features]
    raise SystemExit(f"unknown body kind {kind!r}; choose known, history or cold")


def offer(
    url: str, rate: int, seconds: float, connections: int, lines: Path, pin: str = ""
) -> dict:
    """One open-loop run of ``wrk`` at ``rate`` requests/s (on the CPUs ``pin`` lists,
    where given); its summary."""
    with tempfile.TemporaryDirectory() as folder:
        summary = Path(folder) / "summary.json"
        command = [*taskset(pin), "wrk", "-t", str(connections), "-c", str(connections)]
        command += ["-d", f"{max(1, round(seconds))}s", "--timeout", "10s", "-s", str(SCRIPT)]
        command += [f"{url}/recall", "--", str(rate), str(lines), str(connections)]
        env = {**os.environ, "OPENLOOP_OUT": str(summary)}
        subprocess.run(command, check=True, capture_output=True, env=env)
        result = json.loads(summary.read_text())
    result["offered_per_s"] = rate
    result["achieved_per_s"] = round(result["answered"] / result["elapsed_s"], 1)
    return result


def taskset(cpus: str) -> list[str]:
    """The prefix that runs a command on the CPUs ``cpus`` lists (nothing where empty)."""
    return ["taskset", "-c", cpus] if cpus else []


def start_floor(log: Path, prefix: list[str] = ()) -> tuple[subprocess.Popen, str]:
    """``floor_app.py`` (a bare ASGI app: the harness's own floor), as uvicorn serves
    ``twotower serve``, its output in ``log``; ``prefix`` goes before the command."""
    return launch([*prefix, sys.executable, str(FLOOR_APP)], log)


def saturated(result: dict) -> bool:
    return (
        result["achieved_per_s"] < 0.9 * result["offered_per_s"]
        or result["p99_ms"] > SATURATED_P99_MS
    )


def profile(
    url: str,
    pid: int,
    rate: int,
    seconds: float,
    lines: Path,
    out: Path,
    pin: str = "",
    kind: str = "known",
) -> None:
    """Samples the service with py-spy while wrk offers ``rate`` requests of ``lines`` (of
    body ``kind``): a flame graph (``OUT.svg``) and the collapsed stacks (``OUT.txt``, one
    line per stack and count), each from its own run of the same load."""
    spy = shutil.which("py-spy") or shutil.which("py-spy", path=str(Path(sys.executable).parent))
    if spy is None:
        raise SystemExit("py-spy is not installed: pip install py-spy")
    for kind, suffix in (("flamegraph", ".svg"), ("raw", ".txt")):
        command = [spy, "record", "--pid", str(pid), "--duration", str(int(seconds))]
        command += ["--rate", "250", "--nonblocking", "--format", kind]
        command += ["--output", str(out.with_suffix(suffix))]
        sampler = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        time.sleep(1.0)  # py-spy attaches
        offer(url, rate, seconds - 1, 32, lines, pin)
        if sampler.wait(timeout=120) != 0:
            raise SystemExit(f"py-spy failed: {sampler.stderr.read().decode()[-2000:]}")
    retitle(out.with_suffix(".svg"), f"twotower serve under {rate} requests/s ({kind})")


def retitle(svg: Path, title: str) -> None:
    """Puts ``title`` in place of the flame graph's own, which is py-spy's command line
    (with this machine's paths in it)."""
    text = svg.read_text()
    text = re.sub(r'(<text id="title"[^>]*>)[^<]*(</text>)', rf"\g<1>{title}\g<2>", text, count=1)
    svg.write_text(text)


def top_functions(raw: Path, count: int = 25) -> list[tuple[str, float, float]]:
    """(function, share of samples inside it, share of samples in it itself) from py-spy's
    collapsed stacks, the ``count`` largest by inclusive share."""
    inclusive: dict[str, int] = {}
    own: dict[str, int] = {}
    total = 0
    for line in raw.read_text(errors="replace").splitlines():
        stack, _, samples = line.rpartition(" ")
        frames = [re.sub(r":\d+\)$", ")", frame) for frame in stack.split(";")]  # no lines
        total += int(samples)
        for frame in set(frames):
            inclusive[frame] = inclusive.get(frame, 0) + int(samples)
        own[frames[-1]] = own.get(frames[-1], 0) + int(samples)
    ranked = sorted(inclusive, key=inclusive.get, reverse=True)[:count]
    return [(f, inclusive[f] / total, own.get(f, 0) / total) for f in ranked]


def measure(args, artifact: Path, ledger: Path, done: dict) -> None:
    """Every body kind and rate on one artifact, each appended to the ledger."""
    num_items = json.loads((artifact / "manifest.json").read_text())["num_items"]
    process, url = start_server(artifact, args.serve_option, taskset(args.service_cpus))
    load_pin = args.load_cpus
    floor_process, floor_url = None, ""
    try:
        if args.profile:
            kind = args.bodies[0]  # the load: requests of the first body kind
            with tempfile.NamedTemporaryFile("w", suffix=".jsonl", delete=False) as file:
                file.write("\n".join(bodies(artifact, kind)) + "\n")
            out = args.out / f"profile-n{num_items}-{kind}-{args.profile}"
            offer(url, args.profile, 3.0, 32, Path(file.name), load_pin)  # warm-up
            profile(
                url, process.pid, args.profile, args.duration, Path(file.name), out, load_pin, kind
            )
            Path(file.name).unlink()
            for name, inside, itself in top_functions(out.with_suffix(".txt")):
                print(f"  {inside:6.1%} {itself:6.1%}  {name}", flush=True)
            return
        for kind in args.bodies:
            floor = kind == FLOOR  # the same load against the bare app, not the service
            if floor and floor_process is None:
                log = args.out / "floor.log"
                floor_process, floor_url = start_floor(log, taskset(args.service_cpus))
            target = floor_url if floor else url
            with tempfile.NamedTemporaryFile("w", suffix=".jsonl", delete=False) as file:
                file.write("\n".join(bodies(artifact, "known" if floor else kind)) + "\n")
            lines = Path(file.name)
            try:
                offer(target, args.rates[0], 3.0, args.connections, lines, load_pin)  # warm-up
                rate, index = args.rates[0], 0
                while True:
                    name = f"n{num_items}-{kind}-{rate}"
                    if name in done:
                        result = done[name]
                    else:
                        result = offer(
                            target, rate, args.duration, args.connections, lines, load_pin
                        )
                        result.update(
                            name=name,
                            items=num_items,
                            body=kind,
                            service_rss_mib=round(rss_mib(process.pid)),
                            serve_options=args.serve_option,
                            pin=args.pin,
                            connections=args.connections,
                            duration_s=args.duration,
                        )
                        with ledger.open("a") as out:
                            out.write(json.dumps(result) + "\n")
                    print(
                        f"  N={num_items:,} {kind:5} {rate:>6}/s: achieved "
                        f"{result['achieved_per_s']:>8,.0f}/s p50 {result['p50_ms']:.2f} "
                        f"p99 {result['p99_ms']:.2f} p99.9 {result['p999_ms']:.2f} ms, "
                        f"errors {result['non_2xx'] + result['socket_errors']}",
                        flush=True,
                    )
                    index += 1
                    if saturated(result) or (floor and index == len(args.rates)):
                        break  # the floor: the given rates only
                    rate = args.rates[index] if index < len(args.rates) else rate * 2
            finally:
                lines.unlink()
    finally:
        for running in (process, floor_process):
            if running is not None:
                running.send_signal(signal.SIGTERM)
                running.wait(timeout=60)


def markdown(results: list[dict]) -> str:
    lines = [
        "| N | request | offered/s | achieved/s | p50 ms | p99 ms | p99.9 ms | max ms "
        "| non-2xx | socket errors |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        lines.append(
            f"| {r['items']:,} | {r['body']} | {r['offered_per_s']:,} | "
            f"{r['achieved_per_s']:,.0f} | {r['p50_ms']:.2f} | {r['p99_ms']:.2f} | "
            f"{r['p999_ms']:.2f} | {r['max_ms']:.1f} | {r['non_2xx']} | {r['socket_errors']} |"
        )
    lines.append("")
    for (items, body), group in _groups(results).items():
        top = max(r["achieved_per_s"] for r in group)
        if body != FLOOR:  # the floor runs the given rates only: no saturation
            lines.append(f"Saturation, N = {items:,}, {body} users: {top:,.0f} requests/s.")
    return "\n".join(lines)


def compare(ledgers: list[Path], rates: tuple[int, ...] = (250, 500, 1000, 2000)) -> str:
    """One row per ledger and body kind: p50 / p99 ms at each of ``rates`` (or
    "saturated"), the saturation rate, and the errors where there were any."""
    head = " | ".join(f"{rate:,}/s" for rate in rates)
    lines = [
        f"| ledger | request | {head} | saturation |",
        "|---|---|" + "---:|" * (len(rates) + 1),
    ]
    stems = [ledger.stem for ledger in ledgers]
    for ledger in ledgers:
        # a run's own ledger is OUT/openloop.jsonl: named by its folder where stems repeat
        name = ledger.parent.name if stems.count(ledger.stem) > 1 else ledger.stem
        results = [json.loads(line) for line in ledger.read_text().splitlines()]
        for (_, body), group in _groups(results).items():
            at = {r["offered_per_s"]: r for r in group}
            cells = [
                ""
                if rate not in at
                else "saturated"
                if saturated(at[rate])
                else f"{at[rate]['p50_ms']:.1f} / {at[rate]['p99_ms']:.1f}"
                for rate in rates
            ]
            top = max(r["achieved_per_s"] for r in group)
            errors = sum(r["non_2xx"] + r["socket_errors"] for r in group)
            note = f" ({errors} errors)" if errors else ""
            reached = "" if body == FLOOR else f"{top:,.0f}"  # the floor never saturates here
            lines.append(f"| {name} | {body} | {' | '.join(cells)} | {reached}{note} |")
    return "\n".join(lines)


def _groups(results: list[dict]) -> dict[tuple[int, str], list[dict]]:
    groups: dict[tuple[int, str], list[dict]] = {}
    for r in results:
        groups.setdefault((r["items"], r["body"]), []).append(r)
    return groups


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = _groups(results)
    fig, axes = plt.subplots(1, len(groups), figsize=(5 * len(groups), 4), squeeze=False)
    for axis, ((items, body), group) in zip(axes[0], groups.items(), strict=True):
        group = sorted(group, key=lambda r: r["offered_per_s"])
        rates = [r["offered_per_s"] for r in group]
        for key, label in (("p50_ms", "p50"), ("p99_ms", "p99"), ("p999_ms", "p99.9")):
            axis.plot(rates, [r[key] for r in group], marker="o", label=label)
        axis.axhline(5.0, color="grey", linestyle=":", label="5 ms")
        axis.set(xscale="log", yscale="log", xlabel="offered requests/s", ylabel="latency (ms)")
        axis.set_title(f"N = {items:,}, {body} users")
        axis.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("runs/openloop"))
    parser.add_argument("--items", default="100000,1000000")
    parser.add_argument("--rates", default="250,500,1000,2000")
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--bodies", default="known,cold")
    parser.add_argument(
        "--artifacts",
        default="",
        help="measure these artifact folders (comma-separated) instead of building --items",
    )
    parser.add_argument(
        "--serve-option", action="append", default=[], help="passed to twotower serve"
    )
    parser.add_argument(
        "--pin",
        default="",
        metavar="SERVICE:LOAD",
        help="taskset CPU lists: the service's processes (and Redis) on SERVICE, wrk on LOAD",
    )
    parser.add_argument(
        "--redis",
        action="store_true",
        help="users' states in a redis-server of its own (on a free port, filled by "
        "twotower state load), read by the service for every known user",
    )
    parser.add_argument(
        "--profile",
        type=int,
        default=0,
        metavar="RATE",
        help="instead of measuring: sample the service with py-spy for --duration seconds "
        "while requests of the first --bodies kind arrive at RATE/s "
        "(OUT/profile-nN-KIND-RATE.svg and .txt)",
    )
    parser.add_argument(
        "--compare",
        nargs="+",
        type=Path,
        metavar="LEDGER",
        help="instead of measuring: one table of these ledgers' rows (p50 / p99 at each rate)",
    )
    args = parser.parse_args()
    if args.compare:
        print(compare(args.compare))
        return
    if shutil.which("wrk") is None:
        raise SystemExit("wrk is not installed: apt-get install wrk")
    args.rates = [int(r) for r in args.rates.split(",")]
    if args.pin and args.pin.count(":") != 1:
        raise SystemExit(f"--pin {args.pin!r}: expected SERVICE:LOAD CPU lists, e.g. 1:0")
    args.service_cpus, args.load_cpus = args.pin.split(":") if args.pin else ("", "")
    args.bodies = args.bodies.split(",")
    args.out.mkdir(parents=True, exist_ok=True)
    ledger = args.out / "openloop.jsonl"
    done = {}
    if ledger.is_file():
        done = {r["name"]: r for r in map(json.loads, ledger.read_text().splitlines())}
    if args.artifacts:
        artifacts = [Path(a) for a in args.artifacts.split(",")]
    else:
        artifacts = []
        for num_items in (int(n) for n in args.items.split(",")):
            clock = time.perf_counter()
            artifacts.append(build(args.out, num_items, ["hnsw"])["hnsw"])
            print(f"N = {num_items:,}: ready in {time.perf_counter() - clock:.0f} s", flush=True)
    with contextlib.ExitStack() as stack:
        if args.redis:
            from state_scale import load_users, redis_server  # it imports this module

            folder = args.out / "redis"
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir()
            url = stack.enter_context(redis_server(folder, taskset(args.service_cpus)))
            args.serve_option = [*args.serve_option, f"--state={url}"]
        for artifact in artifacts:
            if args.redis:
                loaded = load_users(artifact, url, folder / "load.log")
                print(f"  {loaded['users']:,} users loaded into Redis", flush=True)
            measure(args, artifact, ledger, done)
    if args.profile:
        return
    results = [json.loads(line) for line in ledger.read_text().splitlines()]
    (args.out / "openloop.md").write_text(markdown(results) + "\n")
    plot(results, args.out / "openloop.png")
    print(markdown(results))


if __name__ == "__main__":
    main()
