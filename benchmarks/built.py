"""Training on a data build against training in memory: MovieLens-1M, the same recipe.

    python benchmarks/built.py --out runs/built [--seeds 0,1,2] [--built-seeds 0]
        [--data-dir ../shared/datasets] [--ledger benchmarks/results/built] [--threads 1]

MovieLens-1M's ratings file (ratings >= 3, per-user random 80/10/10, the protocol of
``configs/ml1m.yaml``) read as a plain ``files`` source, and one per-interaction recipe
(a user is their mean-pooled items, 250 at most, the target's own entry blanked; an
item is its id; in-batch softmax with logQ correction; four epochs):

- in memory, once per ``--seeds`` seed: the spread of validation Recall@10 from the
  seed alone;
- through ``twotower data build`` (DuckDB) and ``data.stream.built``, once per
  ``--built-seeds`` seed, its validation ranking every user as in memory.

The build path passes when its validation Recall@10 lies within the in-memory seeds'
range widened by two of their standard deviations. Each finished run is kept as
``<ledger>/ml1m/<memory|built>-s<seed>.json`` and read back instead of trained again.
Writes ``built.json`` and ``built.md`` in --out (and in the ledger).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

DATA = """\
  source: files
  interactions:
    path: {ratings}
    delimiter: "::"
    header: false
    columns: [user, movie, rating]
    query_id: user
    item_id: movie
    weight: rating
  min_weight: 3"""

BUILT = """\
  source: stream
  stream: {{built: {built}, workers: 1, eval_queries: 20000}}"""

CONFIG = """\
data:
{data}
split: {{method: random, ratios: [0.8, 0.1, 0.1], seed: 0}}
features:
  query:
    - {{name: history, kind: history, column: user, item_feature: item_id, max_len: 250}}
  item:
    - {{name: item_id, kind: id, column: movie, dim: 128}}
model:
  query: {{kind: mlp, widths: []}}
  item: {{kind: mlp, widths: []}}
  temperature: 0.1
training:
  history: mask_target
  objective: {{kind: in_batch, logq: counts}}
  epochs: 4
  batch_size: 1024
  lr: 0.005
  metric: valid/recall@10
  ks: [10, 50]
  tensorboard: false
seed: {seed}
threads: {threads}
"""


def run(name: str, data: str, seed: int, args) -> dict:
    """Trains one run (or reads its ledger entry); returns its metrics."""
    entry = args.ledger / "ml1m" / f"{name}.json"
    if entry.is_file():
        return json.loads(entry.read_text())
    folder = args.out / name
    folder.mkdir(parents=True, exist_ok=True)
    config = folder / "config.yaml"
    config.write_text(CONFIG.format(data=data, seed=seed, threads=args.threads))
    command = [sys.executable, "-m", "twotower", "train", str(config), "--out", str(folder / "run")]
    if (folder / "run" / "checkpoints").is_dir():
        command.append("--resume")
    with (folder / "log").open("w") as log:
        if subprocess.run(command, stdout=log, stderr=subprocess.STDOUT).returncode:
            raise SystemExit(f"{name} failed; see {folder / 'log'}")
    metrics = json.loads((folder / "run" / "metrics.json").read_text())
    entry.parent.mkdir(parents=True, exist_ok=True)
    entry.write_text(json.dumps(metrics, indent=2, sort_keys=True))
    print(name, {k: metrics[k] for k in ("valid/recall@10", "test/recall@10")}, flush=True)
    return metrics


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("runs/built"))
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--built-seeds", default="0")
    parser.add_argument("--data-dir", type=Path, default=ROOT.parent / "shared" / "datasets")
    parser.add_argument("--ledger", type=Path, default=ROOT / "benchmarks/results/built")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    ratings = (args.data_dir / "ml-1m" / "ratings_no_timestamps.dat").resolve()
    if not ratings.is_file():
        raise SystemExit(f"MovieLens-1M not found: {ratings}")
    args.out.mkdir(parents=True, exist_ok=True)
    raw = DATA.format(ratings=ratings)
    memory = [run(f"memory-s{s}", raw, int(s), args) for s in args.seeds.split(",")]
    built = args.out / "built"
    if not (built / "manifest.json").is_file():
        config = args.out / "build.yaml"
        config.write_text(CONFIG.format(data=raw, seed=0, threads=args.threads))
        command = [sys.executable, "-m", "twotower", "data", "build", str(config)]
        subprocess.run([*command, "--out", str(built), "--threads", "2"], check=True)
    stream = BUILT.format(built=built.resolve())
    on_build = [run(f"built-s{s}", stream, int(s), args) for s in args.built_seeds.split(",")]
    result = summary(memory, on_build)
    text = json.dumps(result, indent=2)
    for folder in (args.out, args.ledger):
        (folder / "built.json").write_text(text)
        (folder / "built.md").write_text(markdown(result))
    print(markdown(result))


def summary(memory: list[dict], built: list[dict]) -> dict:
    valid = [m["valid/recall@10"] for m in memory]
    spread = statistics.stdev(valid) if len(valid) > 1 else 0.0
    low, high = min(valid) - 2 * spread, max(valid) + 2 * spread
    return {
        "memory_valid_recall@10": valid,
        "memory_test_recall@10": [m["test/recall@10"] for m in memory],
        "built_valid_recall@10": [m["valid/recall@10"] for m in built],
        "built_test_recall@10": [m["test/recall@10"] for m in built],
        "memory_valid_mean": statistics.mean(valid),
        "memory_valid_std": spread,
        "within": [low <= m["valid/recall@10"] <= high for m in built],
    }


def markdown(result: dict) -> str:
    lines = ["| path | seeds | valid Recall@10 | test Recall@10 |", "|---|---:|---|---|"]
    for path in ("memory", "built"):
        valid = result[f"{path}_valid_recall@10"]
        test = result[f"{path}_test_recall@10"]
        lines.append(
            f"| {'in memory' if path == 'memory' else 'data build + stream'} | {len(valid)} | "
            f"{', '.join(f'{v:.4f}' for v in valid)} | {', '.join(f'{v:.4f}' for v in test)} |"
        )
    lines.append("")
    lines.append(
        f"In-memory validation Recall@10 {result['memory_valid_mean']:.4f} ± "
        f"{result['memory_valid_std']:.4f} (seeds); the build's run within the seeds' range "
        f"± 2 standard deviations: {result['within']}."
    )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
