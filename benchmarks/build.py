"""``twotower data build`` at scale: time and peak memory against the number of rows.

    python benchmarks/build.py --out runs/build [--sizes 2000000,20000000]
        [--engines duckdb,spark] [--memory-limit 2GB] [--threads 2] [--quick]

For each size, writes raw interactions (users, items and timestamps drawn with a
popularity skew, about 20 per user, 1,000,000 items at most) as Parquet in row groups,
then runs ``twotower data build`` on them with each engine, in its own process tree:
leave-last-out split, a 50-item history per training row, the latest histories of
every user. The peak memory is the largest sum of the tree's resident memory (the
Python process and, for Spark, its JVM), sampled every 0.2 s (``scale.tree_rss_mib``).

Writes ``build.json``, ``build.md`` and ``build.png`` (seconds and peak memory against
rows, per engine) in --out. ``--quick``: 100,000 and 1,000,000 rows.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parent))
from scale import run_measured  # noqa: E402  (a sibling script)

CONFIG = """\
data:
  source: files
  interactions: {{path: {path}, query_id: user_id, item_id: item_id, timestamp: ts}}
split: {{method: leave_last_out}}
features:
  query:
    - {{name: history, kind: history, column: user_id, item_feature: item_id, max_len: 50}}
  item:
    - {{name: item_id, kind: id, column: item_id}}
"""


def write_raw(path: Path, rows: int, seed: int = 0, chunk: int = 1_000_000) -> None:
    """``rows`` interactions: user u's events in time order, items Zipf-skewed."""
    rng = np.random.default_rng(seed)
    users = max(rows // 20, 1)
    items = min(1_000_000, max(rows // 20, 1000))
    schema = pa.schema([("user_id", pa.int64()), ("item_id", pa.int64()), ("ts", pa.int64())])
    with pq.ParquetWriter(path, schema) as writer:
        for start in range(0, rows, chunk):
            n = min(chunk, rows - start)
            user = rng.integers(0, users, n)
            item = np.minimum(rng.zipf(1.2, n) - 1, items - 1)
            ts = start + np.arange(n)  # later rows are later events
            table = pa.table({"user_id": user, "item_id": item, "ts": ts}, schema=schema)
            writer.write_table(table, row_group_size=250_000)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--sizes", default="2000000,20000000")
    parser.add_argument("--engines", default="duckdb,spark")
    parser.add_argument("--memory-limit", default="2GB")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    sizes = [100_000, 1_000_000] if args.quick else [int(s) for s in args.sizes.split(",")]
    args.out.mkdir(parents=True, exist_ok=True)
    results = []
    for rows in sizes:
        raw = args.out / f"raw-{rows}.parquet"
        if not raw.exists():
            write_raw(raw, rows)
        config = args.out / f"config-{rows}.yaml"
        config.write_text(CONFIG.format(path=raw.resolve()))
        for engine in args.engines.split(","):
            out = args.out / f"built-{engine}-{rows}"
            shutil.rmtree(out, ignore_errors=True)
            command = [
                sys.executable, "-m", "twotower", "data", "build", str(config), "--out", str(out),
                "--engine", engine, "--memory-limit", args.memory_limit,
                "--threads", str(args.threads),
            ]  # fmt: skip
            log = args.out / f"build-{engine}-{rows}.log"
            seconds, peak, status = run_measured(command, log)
            if status != 0:
                raise SystemExit(f"{engine} at {rows:,} rows failed; see {log}")
            manifest = json.loads((out / "manifest.json").read_text())
            results.append(
                {
                    "engine": engine,
                    "rows": rows,
                    "seconds": round(seconds, 1),
                    "peak_mib": round(peak),
                    "rows_per_s": round(rows / seconds),
                    "parts": manifest["rows"],
                }
            )
            print(json.dumps(results[-1]), flush=True)
            shutil.rmtree(out, ignore_errors=True)
    (args.out / "build.json").write_text(json.dumps(results, indent=2))
    (args.out / "build.md").write_text(markdown(results, args))
    plot(results, args.out / "build.png")


def markdown(results: list[dict], args) -> str:
    lines = [
        f"memory limit {args.memory_limit}, {args.threads} threads",
        "",
        "| engine | rows | seconds | rows/s | peak memory (MiB) |",
        "|---|---:|---:|---:|---:|",
    ]
    for r in results:
        lines.append(
            f"| {r['engine']} | {r['rows']:,} | {r['seconds']} | {r['rows_per_s']:,} | "
            f"{r['peak_mib']:,} |"
        )
    return "\n".join(lines) + "\n"


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (left, right) = plt.subplots(1, 2, figsize=(9, 3.5))
    for engine in sorted({r["engine"] for r in results}):
        runs = [r for r in results if r["engine"] == engine]
        rows = [r["rows"] for r in runs]
        left.plot(rows, [r["seconds"] for r in runs], marker="o", label=engine)
        right.plot(rows, [r["peak_mib"] for r in runs], marker="o", label=engine)
    for axis, label in ((left, "seconds"), (right, "peak memory (MiB)")):
        axis.set_xscale("log")
        axis.set_xlabel("interactions")
        axis.set_ylabel(label)
        axis.set_ylim(bottom=0)
        axis.legend()
    figure.suptitle("twotower data build")
    figure.tight_layout()
    figure.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
