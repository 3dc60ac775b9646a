"""The query tower on PyTorch against the same tower on ONNX Runtime, in process.

    python benchmarks/tower_runtime.py ARTIFACT [ARTIFACT ...] --out DIR
        [--batches 1,8,32,256] [--repeats 200] [--threads 1]

Each artifact must have been exported with ``twotower export --onnx``. For each batch
size B, B known users' model inputs (gathered as the service gathers them) go
through each runtime ``--repeats`` times, alternating the runtimes so that both see
the same machine state; the figure is the median time of a pass, and the ratio
ONNX / PyTorch of the medians (below 1: ONNX Runtime is faster). The vectors of both
are compared too (largest absolute difference).

Each finished (artifact, B) is appended to ``DIR/tower_runtime.jsonl`` (a rerun skips
what is there); ``DIR/tower_runtime.md`` is the table.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from twotower.serving import Retriever
from twotower.serving.runtime import tower_runtime
from twotower.threads import set_threads


def measure(artifact: Path, batch: int, repeats: int) -> dict:
    """Median seconds of one pass of ``batch`` known users per runtime."""
    retriever = Retriever.load(artifact)
    inputs = retriever.known_inputs
    if inputs is None:
        raise SystemExit(f"{artifact}: its known users' inputs are over the memory budget")
    runtimes = {name: tower_runtime(retriever.artifact, name) for name in ("torch", "onnx")}
    rng = np.random.default_rng(0)
    rows = [
        torch.from_numpy(rng.choice(retriever.artifact.queries.num_rows, batch))
        for _ in range(repeats)
    ]
    times: dict[str, list[float]] = {name: [] for name in runtimes}
    for runtime in runtimes.values():  # warm-up
        runtime.vectors([{k: v[rows[0]] for k, v in inputs.items()}])
    for picked in rows:
        chunk = {name: values[picked] for name, values in inputs.items()}
        for name, runtime in runtimes.items():
            clock = time.perf_counter()
            runtime.vectors([chunk])
            times[name].append(time.perf_counter() - clock)
    chunk = {name: values[rows[0]] for name, values in inputs.items()}
    difference = np.abs(runtimes["onnx"].vectors([chunk]) - runtimes["torch"].vectors([chunk]))
    medians = {name: statistics.median(t) for name, t in times.items()}
    return {
        "artifact": artifact.name,
        "users": retriever.artifact.queries.num_rows,
        "items": retriever.num_items,
        "batch": batch,
        "repeats": repeats,
        "threads": torch.get_num_threads(),
        "torch_ms": medians["torch"] * 1e3,
        "onnx_ms": medians["onnx"] * 1e3,
        "ratio": medians["onnx"] / medians["torch"],
        "max_abs_diff": float(difference.max()),
    }


def markdown(results: list[dict]) -> str:
    lines = [
        "| artifact | batch | PyTorch, ms | ONNX Runtime, ms | ONNX / PyTorch "
        "| largest difference |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        lines.append(
            f"| {r['artifact']} ({r['items']:,} items) | {r['batch']} | {r['torch_ms']:.3f} | "
            f"{r['onnx_ms']:.3f} | {r['ratio']:.2f} | {r['max_abs_diff']:.1e} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("artifacts", type=Path, nargs="+")
    parser.add_argument("--out", type=Path, default=Path("runs/tower_runtime"))
    parser.add_argument("--batches", default="1,8,32,256")
    parser.add_argument("--repeats", type=int, default=200)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    set_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    ledger = args.out / "tower_runtime.jsonl"
    done = set()
    if ledger.is_file():
        finished = map(json.loads, ledger.read_text().splitlines())
        done = {(r["artifact"], r["batch"]) for r in finished}
    for artifact in args.artifacts:
        for batch in map(int, args.batches.split(",")):
            if (artifact.name, batch) in done:
                continue
            result = measure(artifact, batch, args.repeats)
            with ledger.open("a") as f:
                f.write(json.dumps(result) + "\n")
            print(json.dumps(result), flush=True)
    results = [json.loads(line) for line in ledger.read_text().splitlines()]
    (args.out / "tower_runtime.md").write_text(markdown(results) + "\n")
    print(markdown(results))


if __name__ == "__main__":
    main()
