"""Training at scale: streamed Parquet, bounded memory, one and two processes.

    python benchmarks/scale.py --out runs/scale [--data runs/scale/data]
        [--interactions 20000000] [--items 1000000] [--steps 400] [--quick]

1. Writes the synthetic stream (``twotower data synth --interactions N --items M``)
   unless ``--data`` already holds it.
2. Trains from the stream (``data.source: stream``), ``--steps`` steps of 1,024 rows
   then validation on 20,000 held-out users against the whole corpus, in one process
   (``twotower train``) and in two (``torchrun --nproc_per_node=2``), each in its own
   process tree. The peak memory is the largest sum of the tree's resident memory
   (every rank and DataLoader worker), sampled every 0.2 s.
3. Measures the same for an in-memory load of the same training rows: the whole
   table read and every row turned into model inputs, what a non-streaming loader
   holds before its first step.
4. Repeats the one-process stream run on a tenth of the rows, so that the memory of
   the two sizes can be compared: a bounded loader's does not grow with the data.
5. Times one optimizer step on embedding tables of 100K, 1M and 10M rows hit by 1,024
   ids: dense gradients cost in proportion to the table, sparse ones to the ids.

Writes ``scale.json`` and ``scale.md`` in --out. ``--quick``: 300,000 interactions,
20,000 items, 50 steps (a few minutes), to try the suite out.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

CONFIG = """\
data:
  source: stream
  stream:
    train: {train}
    valid: {data}/valid.parquet
    test: {data}/test.parquet
    items: {data}/items.parquet
    buffer_rows: 200000
    workers: 1
    eval_queries: 20000
features:
  query:
    - {{name: user_id, kind: id, column: user_id, hash_buckets: 1000000, hash_functions: 2}}
    - {{name: segment, kind: onehot, column: segment}}
    - {{name: age, kind: dense, column: age, transform: standardize}}
    - {{name: sessions, kind: dense, column: sessions, transform: log1p}}
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
  objective: {{kind: in_batch, logq: streaming}}
  epochs: 1
  steps_per_epoch: {steps}
  batch_size: 1024
  sparse_optimizer: adagrad
  lr: 0.01
  metric: valid/recall@10
  ks: [10, 100]
  tensorboard: false
"""

IN_MEMORY = """\
import sys, pyarrow.parquet as pq
from twotower.features.pipeline import FeaturePipeline
table = pq.read_table(sys.argv[1])
pipeline = FeaturePipeline.load(__import__("pathlib").Path(sys.argv[2]))
inputs = pipeline.transform("query", table)
print(table.num_rows, sum(t.numel() * t.element_size() for t in inputs.values()))
"""


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


def run_measured(command: list[str], log: Path) -> tuple[float, float, int]:
    """Runs a command; returns (seconds, peak tree RSS in MiB, exit status)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
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


def train(name: str, args, data: Path, train_path: Path, processes: int) -> dict:
    folder = args.out / name
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    config = folder / "config.yaml"
    config.write_text(
        CONFIG.format(data=data.resolve(), train=train_path.resolve(), steps=args.steps)
    )
    if processes == 1:
        command = [sys.executable, "-m", "twotower", "train", str(config)]
    else:
        torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent))
        command = [torchrun, "--standalone", f"--nproc_per_node={processes}", "-m", "twotower"]
        command += ["train", str(config)]
    seconds, peak, status = run_measured([*command, "--out", str(folder / "run")], folder / "log")
    if status:
        raise SystemExit(f"{name} failed; see {folder / 'log'}")
    record = json.loads((folder / "run" / "metrics.jsonl").read_text().splitlines()[0])
    return {
        "processes": processes,
        "rows": _rows(train_path),
        "steps": args.steps,
        "examples_per_s": record["examples_per_s"],
        "train_seconds": record["train_seconds"],
        "valid/recall@10": record["valid/recall@10"],
        "seconds": seconds,
        "peak_rss_mib": peak,
    }


def _rows(path: Path) -> int:
    import pyarrow.parquet as pq

    return sum(pq.ParquetFile(f).metadata.num_rows for f in sorted(path.rglob("*.parquet")))


def in_memory(args, train_path: Path, features: Path) -> dict:
    log = args.out / "in-memory.log"
    command = [sys.executable, "-c", IN_MEMORY, str(train_path), str(features)]
    seconds, peak, status = run_measured(command, log)
    if status:
        raise SystemExit(f"the in-memory load failed; see {log}")
    rows, input_bytes = (int(v) for v in log.read_text().split()[-2:])
    return {
        "rows": rows,
        "input_mib": input_bytes / 2**20,
        "seconds": seconds,
        "peak_rss_mib": peak,
    }


def tenth(data: Path) -> Path:
    """A folder holding the first tenth of the training part files (at least one)."""
    files = sorted((data / "train").glob("*.parquet"))
    folder = data / "train-tenth"
    if not folder.exists():
        folder.mkdir()
        import pyarrow.parquet as pq

        table = pq.read_table(files[0])
        total = _rows(data / "train")
        pq.write_table(
            table.slice(0, total // 10), folder / "part-00000.parquet", row_group_size=131_072
        )
    return folder


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("runs/scale"))
    parser.add_argument("--data", type=Path, default=None)
    parser.add_argument("--interactions", type=int, default=20_000_000)
    parser.add_argument("--items", type=int, default=1_000_000)
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    if args.quick:
        args.interactions, args.items, args.steps = 300_000, 20_000, 50
    args.out.mkdir(parents=True, exist_ok=True)
    data = args.data or args.out / "data"
    if not (data / "items.parquet").is_file():
        synth = [sys.executable, "-m", "twotower", "data", "synth", "--out", str(data)]
        synth += ["--interactions", str(args.interactions), "--items", str(args.items)]
        seconds, peak, status = run_measured(synth, args.out / "synth.log")
        if status:
            raise SystemExit(f"data synth failed; see {args.out / 'synth.log'}")
        print(f"synth: {seconds:.0f} s, peak {peak:,.0f} MiB", flush=True)
    results = {"machine": f"{os.cpu_count()} CPU cores"}
    sizes = [100_000, 1_000_000] if args.quick else [100_000, 1_000_000, 10_000_000]
    results["sparse"] = sparse_steps(sizes)
    results["stream-1"] = train("stream-1", args, data, data / "train", 1)
    print("stream, 1 process", results["stream-1"], flush=True)
    results["stream-2"] = train("stream-2", args, data, data / "train", 2)
    print("stream, 2 processes", results["stream-2"], flush=True)
    results["stream-1-tenth"] = train("stream-1-tenth", args, data, tenth(data), 1)
    print("stream, 1 process, a tenth of the rows", results["stream-1-tenth"], flush=True)
    features = args.out / "stream-1" / "run" / "features"
    results["in-memory"] = in_memory(args, data / "train", features)
    print("in memory", results["in-memory"], flush=True)
    (args.out / "scale.json").write_text(json.dumps(results, indent=2))
    (args.out / "scale.md").write_text(markdown(results))
    print(markdown(results))


def markdown(results: dict) -> str:
    lines = [
        "| run | training rows | examples/s | peak memory (process tree) |",
        "|---|---:|---:|---:|",
    ]
    for name in ("stream-1", "stream-2", "stream-1-tenth"):
        r = results[name]
        label = f"stream, {r['processes']} process{'es' if r['processes'] > 1 else ''}"
        lines.append(
            f"| {label} | {r['rows']:,} | {r['examples_per_s']:,.0f} | "
            f"{r['peak_rss_mib']:,.0f} MiB |"
        )
    r = results["in-memory"]
    lines.append(
        f"| in memory: the rows read and turned into inputs (no training) | {r['rows']:,} | - | "
        f"{r['peak_rss_mib']:,.0f} MiB |"
    )
    lines += [
        "",
        "| embedding rows | dense gradient + Adam | sparse gradient + Adagrad |",
        "|---:|---:|---:|",
    ]
    for r in results["sparse"]:
        lines.append(f"| {r['rows']:,} | {r['dense_ms']:.2f} ms | {r['sparse_ms']:.2f} ms |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
