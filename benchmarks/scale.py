"""The whole pipeline at scale, from raw logs to a served artifact, in bounded memory.

    python benchmarks/scale.py --out runs/scale [--sizes 2000000,20000000]
        [--items 1000000] [--engines duckdb,spark] [--steps 400] [--memory-limit 2GB]
        [--sample 10000] [--quick]

For each size (interactions, about 20 per user, ``--items`` items):

1. ``twotower data synth --raw``: raw logs with the generator's planted clusters
   (every event in ``interactions/``, a user table, an item table).
2. ``twotower data build`` on DuckDB (``--memory-limit``, two threads), then on Spark
   ``local[2]``: the leave-last-out split, a 50-item history for every row and the
   features fitted once. Training reads the DuckDB build.
3. ``twotower train`` from the build (``data.stream.built``), ``--steps`` steps of 1,024
   rows then validation on 5,000 held-out users against the whole corpus, in one
   process and in two (``torchrun --nproc_per_node=2``).
4. ``twotower evaluate --split test --sample N``: about N users' test items ranked
   exactly against the whole corpus, their histories read from the build.
5. ``twotower export --index auto``: item vectors, index and every user's state.
6. ``twotower serve`` on the artifact: the seconds until it answers, then 1,000
   known-user requests one after another on a keep-alive connection (latency p50 and
   p99), and the service's resident memory.

Each command runs in its own process tree; its peak memory is the largest sum of the
tree's resident memory (every rank, DataLoader worker and, for Spark, the JVM),
sampled every 0.2 s. Also times one optimizer step on embedding tables of 100K, 1M and
10M rows hit by 1,024 ids (dense against sparse gradients).

Writes ``scale.json``, ``scale.md`` and ``scale.png`` (peak memory per stage, by size)
in --out. ``--quick``: 100,000 and 300,000 interactions, 20,000 items, 50 steps.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

CONFIG = """\
data:
{data}
split: {{method: leave_last_out}}
features:
  query:
    - {{name: user_id, kind: id, column: user_id, hash_buckets: 1000000, hash_functions: 2}}
    - {{name: segment, kind: onehot, column: segment}}
    - {{name: age, kind: dense, column: age, transform: standardize}}
    - {{name: sessions, kind: dense, column: sessions, transform: log1p}}
    - {{name: history, kind: history, column: user_id, item_feature: item_id, max_len: 50}}
  item:
    - {{name: item_id, kind: id, column: item_id, dim: 32}}
    - {{name: category, kind: onehot, column: category}}
    - {{name: price, kind: dense, column: price, transform: bucketize}}
    - {{name: genres, kind: multihot, column: genres}}
    - {{name: title, kind: text, column: title, buckets: 20000, max_len: 16}}
model:
  query: {{kind: mlp, widths: [256, 64]}}
  item: {{kind: mlp, widths: [256, 64]}}
  sparse_embeddings: true
training:
  objective: {{kind: in_batch, logq: counts}}
  epochs: 1
  steps_per_epoch: {steps}
  batch_size: 1024
  eval_batch_size: 256
  sparse_optimizer: adagrad
  lr: 0.01
  metric: valid/recall@10
  ks: [10, 100]
  tensorboard: false
"""

RAW = """\
  source: files
  interactions:
    {{path: {raw}/interactions, query_id: user_id, item_id: item_id, timestamp: timestamp}}
  queries: {{path: {raw}/users.parquet, key: user_id}}
  items: {{path: {raw}/items.parquet, key: item_id}}"""

BUILT = """\
  source: stream
  stream: {{built: {built}, buffer_rows: 200000, workers: 1, eval_queries: 5000}}"""


def tree_rss_mib(pid: int) -> float:
    """Resident memory of a process and all its descendants, in MiB."""
    total, stack = 0, [pid]
    while stack:
        current = stack.pop()
        try:
            status = Path(f"/proc/{current}/status").read_text()
            total += int(re.search(r"VmRSS:\s+(\d+) kB", status).group(1))
            for task in Path(f"/proc/{current}/task").iterdir():
                children = (task / "children").read_text().split()
                stack.extend(int(c) for c in children)
        except (FileNotFoundError, ProcessLookupError, AttributeError):
            continue
    return total / 1024


def run_measured(
    command: list[str], log: Path, env: dict[str, str] | None = None
) -> tuple[float, float, int]:
    """Runs a command, its output to ``log``, with ``env`` added to the environment
    (default: this checkout's ``src`` first on the path); returns (seconds, peak tree
    RSS in MiB, exit status)."""
    env = {**os.environ, **(env or {"PYTHONPATH": str(ROOT / "src")})}
    clock = time.perf_counter()
    with log.open("w") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env)
        peak = [0.0]

        def sample() -> None:
            while process.poll() is None:
                peak[0] = max(peak[0], tree_rss_mib(process.pid))
                time.sleep(0.2)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        status = process.wait()
        sampler.join()
    return time.perf_counter() - clock, peak[0], status


def sparse_steps(rows_list: list[int], repeats: int = 7) -> list[dict]:
    """Median time of one optimizer step on a 32-wide table hit by 1,024 ids, by table size:
    dense gradients with Adam, and sparse gradients with Adagrad (``model.sparse_embeddings``),
    through the towers' own table and optimizer builders."""
    import statistics

    import torch

    from twotower.towers.encoders import embedding_table
    from twotower.training.config import TrainingConfig
    from twotower.training.trainer import build_optimizers

    results = []
    generator = torch.Generator().manual_seed(0)
    for rows in rows_list:
        row = {"rows": rows}
        for sparse in (False, True):
            table = embedding_table(rows, 32, sparse)
            config = TrainingConfig(sparse_optimizer="adagrad", lr=0.01)
            optimizers = build_optimizers(torch.nn.ModuleList([table]), config)
            times = []
            for _ in range(repeats + 1):  # the first step allocates optimizer state
                ids = torch.randint(rows, (1024,), generator=generator)
                clock = time.perf_counter()
                loss = table(ids).square().sum()
                for optimizer in optimizers:
                    optimizer.zero_grad(set_to_none=True)
                loss.backward()
                for optimizer in optimizers:
                    optimizer.step()
                times.append(time.perf_counter() - clock)
            row["sparse_ms" if sparse else "dense_ms"] = statistics.median(times[1:]) * 1000
            del table, optimizers
        results.append(row)
        print("step time", row, flush=True)
    return results


def stage(results: dict, name: str, command: list[str], log: Path) -> bool:
    """Runs one stage's command, measured, unless ``results`` (the size's ledger,
    ``stages.json``) has it; records and prints its seconds and peak. Returns whether
    it ran."""
    if name in results:
        print(f"  {name}: recorded, {results[name]}", flush=True)
        return False
    seconds, peak, status = run_measured(command, log)
    if status:
        raise SystemExit(f"{name} failed; see {log}")
    results[name] = {"seconds": round(seconds, 1), "peak_rss_mib": round(peak)}
    print(f"  {name}: {seconds:,.0f} s, peak {peak:,.0f} MiB", flush=True)
    return True


def _save(results: dict, folder: Path) -> None:
    (folder / "stages.json").write_text(json.dumps(results, indent=2))


def twotower(*args: str) -> list[str]:
    return [sys.executable, "-m", "twotower", *args]


def one_size(args, rows: int) -> dict:
    """Every stage on ``rows`` interactions (see the module doc)."""
    folder, results = size_folder(args.out, rows)
    synth_raw(args, folder, results)
    for engine in args.engines:
        build_raw(args, folder, results, engine)
    for processes in (1, 2):
        train_built(args, folder, results, processes)
    run = folder / "run-1"
    command = twotower("evaluate", str(run), "--split", "test", "--sample", str(args.sample))
    if stage(results, "evaluate", command, folder / "evaluate.log"):
        metrics = json.loads((run / "evaluation-test.json").read_text())
        results["evaluate"].update(
            queries=metrics["test/queries"], test_recall_at_10=metrics["test/recall@10"]
        )
        _save(results, folder)
    artifact = export_artifact(folder, results)
    if "serve" not in results:
        results["serve"] = serve(artifact)
        _save(results, folder)
    print(f"  serve: {results['serve']}", flush=True)
    return results


def size_folder(out: Path, rows: int) -> tuple[Path, dict]:
    """``OUT/rows-N`` and its ledger of finished stages (``stages.json``, kept across
    restarts)."""
    folder = out / f"rows-{rows}"
    folder.mkdir(parents=True, exist_ok=True)
    ledger = folder / "stages.json"
    results: dict = json.loads(ledger.read_text()) if ledger.is_file() else {"rows": rows}
    return folder, results


def synth_raw(args, folder: Path, results: dict) -> None:
    """``data synth --raw``: ``results["rows"]`` interactions over ``args.items`` items."""
    raw = folder / "raw"
    if not (raw / "users.parquet").is_file():
        results.pop("synth", None)
        synth = twotower("data", "synth", "--raw", "--out", str(raw), "--per-query", "20")
        synth += ["--interactions", str(results["rows"]), "--items", str(args.items)]
        stage(results, "synth", synth, folder / "synth.log")
        _save(results, folder)


def build_raw(args, folder: Path, results: dict, engine: str) -> None:
    """``data build`` of the raw logs on ``engine`` (DuckDB: under ``args.memory_limit``)."""
    raw_config = folder / "raw.yaml"
    raw = (folder / "raw").resolve()
    raw_config.write_text(CONFIG.format(data=RAW.format(raw=raw), steps=args.steps))
    out = folder / f"built-{engine}"
    command = twotower("data", "build", str(raw_config), "--out", str(out))
    command += ["--engine", engine, "--threads", "2"]
    if engine == "duckdb":
        command += ["--memory-limit", args.memory_limit]
    if stage(results, f"build-{engine}", command, folder / f"build-{engine}.log"):
        results[f"build-{engine}"]["rows"] = _manifest_rows(out)
        _save(results, folder)


def train_built(args, folder: Path, results: dict, processes: int) -> None:
    """``train`` from the DuckDB build, in one process or under torchrun."""
    name = f"train-{processes}"
    if name in results:
        return
    config = folder / "built.yaml"
    built = (folder / "built-duckdb").resolve()
    config.write_text(CONFIG.format(data=BUILT.format(built=built), steps=args.steps))
    run = folder / f"run-{processes}"
    if processes == 1:
        command = twotower("train", str(config), "--out", str(run))
    else:
        torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent))
        command = [torchrun, "--standalone", f"--nproc_per_node={processes}", "-m"]
        command += ["twotower", "train", str(config), "--out", str(run)]
    shutil.rmtree(run, ignore_errors=True)
    stage(results, name, command, folder / f"{name}.log")
    record = json.loads((run / "metrics.jsonl").read_text().splitlines()[0])
    results[name].update(
        examples_per_s=round(record["examples_per_s"]),
        steps_seconds=round(record["train_seconds"], 1),
        valid_recall_at_10=record["valid/recall@10"],
    )
    _save(results, folder)


def export_artifact(folder: Path, results: dict) -> Path:
    """``export --index auto`` of the one-process run; returns the artifact folder."""
    artifact = folder / "artifact"
    command = twotower("export", str(folder / "run-1"), "--out", str(artifact), "--index", "auto")
    if stage(results, "export", command, folder / "export.log"):
        manifest = json.loads((artifact / "manifest.json").read_text())
        results["export"].update(
            index=manifest["index"], index_recall_at_10=manifest["index_recall"]["recall"]
        )
        _save(results, folder)
    return artifact


def _manifest_rows(folder: Path) -> dict:
    return json.loads((folder / "manifest.json").read_text())["rows"]


def serve(artifact: Path, requests: int = 1000) -> dict:
    """Starts the service, times its start, sends known-user requests one at a time on
    a keep-alive connection; returns the start seconds, latencies and memory."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from serving import _known_users, exchange, requests_for, rss_mib, start_server

    clock = time.perf_counter()
    process, url = start_server(artifact)
    started = time.perf_counter() - clock
    try:
        bodies = requests_for(_known_users(artifact), requests)
        host, port = url.removeprefix("http://").split(":")

        async def send() -> list[float]:
            reader, writer = await asyncio.open_connection(host, int(port))
            latencies = []
            for body in bodies:
                begin = time.perf_counter()
                status = await exchange(reader, writer, body)
                if b" 200 " not in status:
                    raise SystemExit(f"the service answered {status!r}")
                latencies.append(time.perf_counter() - begin)
            writer.close()
            return latencies

        latencies = sorted(asyncio.run(send()))
        return {
            "start_seconds": round(started, 1),
            "requests": requests,
            "p50_ms": round(statistics.median(latencies) * 1000, 2),
            "p99_ms": round(latencies[int(0.99 * len(latencies)) - 1] * 1000, 2),
            "rss_mib": round(rss_mib(process.pid)),
        }
    finally:
        process.terminate()
        process.wait(timeout=60)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("runs/scale"))
    parser.add_argument("--sizes", default="2000000,20000000")
    parser.add_argument("--items", type=int, default=1_000_000)
    parser.add_argument("--engines", default="duckdb,spark")
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--memory-limit", default="2GB")
    parser.add_argument("--sample", type=int, default=10_000)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    if args.quick:
        sizes, args.items, args.steps, args.sample = [100_000, 300_000], 20_000, 50, 2000
    args.engines = args.engines.split(",")
    if "duckdb" not in args.engines:
        raise SystemExit("--engines must include duckdb: training reads its build")
    args.out.mkdir(parents=True, exist_ok=True)
    results: dict = {"machine": f"{os.cpu_count()} CPU cores", "items": args.items, "sizes": []}
    steps = [100_000, 1_000_000] if args.quick else [100_000, 1_000_000, 10_000_000]
    results["sparse"] = sparse_steps(steps)
    for rows in sizes:
        print(f"{rows:,} interactions, {args.items:,} items", flush=True)
        results["sizes"].append(one_size(args, rows))
        (args.out / "scale.json").write_text(json.dumps(results, indent=2))
    (args.out / "scale.md").write_text(markdown(results))
    plot(results, args.out / "scale.png")
    print(markdown(results))


STAGES = [
    ("build-duckdb", "data build (DuckDB)"),
    ("build-spark", "data build (Spark local[2])"),
    ("train-1", "train, 1 process"),
    ("train-2", "train, 2 processes"),
    ("evaluate", "evaluate (sampled users, full corpus)"),
    ("export", "export"),
]


def markdown(results: dict) -> str:
    sizes = results["sizes"]
    head = " | ".join(f"{s['rows']:,} rows: time, peak memory" for s in sizes)
    lines = [f"| stage | {head} |", "|---|" + "---:|" * len(sizes)]
    for key, label in STAGES:
        cells = [
            f"{s[key]['seconds']:,.0f} s, {s[key]['peak_rss_mib']:,} MiB" if key in s else "-"
            for s in sizes
        ]
        lines.append(f"| {label} | {' | '.join(cells)} |")
    cells = [
        f"start {s['serve']['start_seconds']:,.0f} s, {s['serve']['rss_mib']:,} MiB" for s in sizes
    ]
    lines.append(f"| serve | {' | '.join(cells)} |")
    lines += [
        "",
        "| rows | users | train ex/s (1 / 2 processes) | valid R@10 | test R@10 "
        "(users) | index (recall@10) | request p50 / p99 |",
        "|---:|---:|---:|---:|---:|---|---:|",
    ]
    for s in sizes:
        users = s["build-duckdb"]["rows"]["test"]
        lines.append(
            f"| {s['rows']:,} | {users:,} | {s['train-1']['examples_per_s']:,} / "
            f"{s['train-2']['examples_per_s']:,} | {s['train-1']['valid_recall_at_10']:.4f} | "
            f"{s['evaluate']['test_recall_at_10']:.4f} ({s['evaluate']['queries']:,}) | "
            f"{s['export']['index']} ({s['export']['index_recall_at_10']:.3f}) | "
            f"{s['serve']['p50_ms']:.1f} / {s['serve']['p99_ms']:.1f} ms |"
        )
    lines += [
        "",
        "| embedding rows | dense gradient + Adam | sparse gradient + Adagrad |",
        "|---:|---:|---:|",
    ]
    for r in results["sparse"]:
        lines.append(f"| {r['rows']:,} | {r['dense_ms']:.2f} ms | {r['sparse_ms']:.2f} ms |")
    return "\n".join(lines) + "\n"


def plot(results: dict, path: Path) -> None:
    """Peak memory of each stage, one bar per size."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    sizes = results["sizes"]
    stages = [(k, label) for k, label in STAGES if all(k in s for s in sizes)]
    x = np.arange(len(stages) + 1)
    width = 0.8 / len(sizes)
    figure, axis = plt.subplots(figsize=(10, 4.5))
    for i, s in enumerate(sizes):
        peaks = [s[k]["peak_rss_mib"] for k, _ in stages] + [s["serve"]["rss_mib"]]
        axis.bar(x + i * width, peaks, width, label=f"{s['rows']:,} interactions")
    axis.set_xticks(x + width * (len(sizes) - 1) / 2)
    axis.set_xticklabels([label for _, label in stages] + ["serve"], rotation=20, ha="right")
    axis.set_ylabel("peak resident memory (MiB)")
    axis.set_title(f"raw logs to a served artifact, {results['items']:,} items")
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


if __name__ == "__main__":
    main()
