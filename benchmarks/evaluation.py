"""Time of exact full-corpus evaluation of a trained run (all its users, all items).

    python benchmarks/evaluation.py RUN_DIR [--repeats 5]

Loads the run's model and data once, then times ``evaluate_model`` on the test
split (embed every query and item, score every user against the whole corpus in
chunks, exact top-K, metrics) and reports the median of the repeats, beside the
time of a single dense (users x items) matmul + full sort as a baseline measured in
the same process.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from twotower.sources import load_data
from twotower.training.evaluate import embed_all, evaluate_model
from twotower.training.examples import TrainingData
from twotower.training.run import load_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    config, pipeline, model = load_model(args.run_dir)
    dataset, split = load_data(config)
    data = TrainingData(dataset, split, pipeline, config.training.history)
    ks = config.training.ks
    timings, baseline = [], []
    for _ in range(args.repeats):
        clock = time.perf_counter()
        metrics = evaluate_model(model, data, "test", ks)
        timings.append(time.perf_counter() - clock)
        clock = time.perf_counter()
        queries, items = embed_all(model, data, 1024, "test")
        torch.sort(queries @ items.T, dim=1, descending=True)
        baseline.append(time.perf_counter() - clock)
    print(
        f"{dataset.num_queries} queries x {dataset.num_items} items, "
        f"{metrics['test/queries']} evaluated, ks {ks}: "
        f"median {statistics.median(timings):.2f} s over {args.repeats} runs "
        f"(dense matmul + full sort, no filtering or metrics: "
        f"{statistics.median(baseline):.2f} s)"
    )


if __name__ == "__main__":
    main()
