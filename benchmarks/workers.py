"""Memory and answers of ``twotower serve --workers N`` against one process.

    python benchmarks/workers.py ARTIFACT --out DIR [--workers 1,2,4] [--users 300]
        [--serve-option=--runtime=onnx ...]

For each N the service starts with N workers; ``--users`` known users are asked for
their top 10, each request on a new connection (so every worker answers some), and
the answers must equal those of N = 1. Then each process of the service (the parent,
its workers, multiprocessing's resource tracker) is read from ``/proc``: RSS, what
``top`` shows, counts a page shared by several processes in each of them; PSS
divides it among them, so the sum of PSS over the processes is the memory the
service takes. The ratio PSS(N) / PSS(1) is the figure: N separate copies would be N.

Each N is appended to ``DIR/workers.jsonl`` (a rerun skips what is there);
``DIR/workers.md`` is the table. Linux only (``/proc``).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pyarrow.parquet as pq


def memory_mib(pid: int) -> dict[str, float]:
    """RSS and PSS of one process, MiB."""
    fields = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]:
        name, value = line.split(":", 1)
        fields[name] = int(value.split()[0]) / 1024
    return {"rss": fields["Rss"], "pss": fields["Pss"]}


def service_pids(parent: int) -> list[int]:
    """The parent and every process under it."""
    out = subprocess.run(["ps", "-e", "-o", "pid=,ppid="], capture_output=True, check=True)
    children: dict[int, list[int]] = {}
    for line in out.stdout.decode().splitlines():
        pid, ppid = map(int, line.split())
        children.setdefault(ppid, []).append(pid)
    found, todo = [], [parent]
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo.extend(children.get(pid, []))
    return found


def measure(artifact: Path, workers: int, users: list, options: list[str]) -> tuple[dict, list]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    command = [sys.executable, "-m", "twotower", "serve", str(artifact), "--port", "0"]
    command += ["--workers", str(workers), *options]
    clock = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
    try:
        line = process.stdout.readline().decode()
        if "Serving" not in line:
            raise SystemExit(f"the service did not start: {line}{process.stdout.read().decode()}")
        started = time.perf_counter() - clock
        url = line.split(" on ")[1].split(" ")[0]
        answers = []
        for user in users:
            with httpx.Client(base_url=url, timeout=60) as http:
                response = http.post("/recall", json={"user_id": user, "k": 10})
                response.raise_for_status()
                answers.append(response.json()["items"])
        pids = service_pids(process.pid)
        memory = {pid: memory_mib(pid) for pid in pids}
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=120)
    return {
        "artifact": str(artifact.name),
        "workers": workers,
        "options": options,
        "start_s": started,
        "processes": len(pids),
        "rss_mib": sum(m["rss"] for m in memory.values()),
        "pss_mib": sum(m["pss"] for m in memory.values()),
        "per_process_pss_mib": sorted(round(m["pss"]) for m in memory.values()),
    }, answers


def markdown(results: list[dict]) -> str:
    one = {r["artifact"]: r["pss_mib"] for r in results if r["workers"] == 1}
    lines = [
        "| artifact | workers | processes | start, s | sum of RSS, MiB | sum of PSS, MiB "
        "| PSS / one worker's | answers equal one worker's |",
        "|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in results:
        ratio = r["pss_mib"] / one[r["artifact"]] if r["artifact"] in one else float("nan")
        lines.append(
            f"| {r['artifact']} | {r['workers']} | {r['processes']} | {r['start_s']:.1f} | "
            f"{r['rss_mib']:,.0f} | {r['pss_mib']:,.0f} | {ratio:.2f} | "
            f"{r['answers_equal']} ({r['users']} users) |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("artifact", type=Path)
    parser.add_argument("--out", type=Path, default=Path("runs/workers"))
    parser.add_argument("--workers", default="1,2,4")
    parser.add_argument("--users", type=int, default=300)
    parser.add_argument("--serve-option", action="append", default=[])
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    ledger = args.out / "workers.jsonl"
    done = {}
    if ledger.is_file():
        finished = map(json.loads, ledger.read_text().splitlines())
        done = {(r["artifact"], r["workers"]) for r in finished}
    manifest = json.loads((args.artifact / "manifest.json").read_text())
    keys = pq.read_table(args.artifact / "queries.parquet", columns=[manifest["query_key"]])
    rng = np.random.default_rng(0)
    users = keys.column(0).take(rng.choice(keys.num_rows, args.users, replace=False)).to_pylist()
    baseline = None
    for workers in [int(n) for n in args.workers.split(",")]:
        if (args.artifact.name, workers) in done and workers != 1:
            continue
        result, answers = measure(args.artifact, workers, users, args.serve_option)
        baseline = answers if workers == 1 else baseline
        result["users"] = len(users)
        result["answers_equal"] = baseline is not None and answers == baseline
        print(json.dumps(result), flush=True)
        if (args.artifact.name, workers) not in done:
            with ledger.open("a") as f:
                f.write(json.dumps(result) + "\n")
    results = [json.loads(line) for line in ledger.read_text().splitlines()]
    (args.out / "workers.md").write_text(markdown(results) + "\n")
    print(markdown(results))


if __name__ == "__main__":
    main()
