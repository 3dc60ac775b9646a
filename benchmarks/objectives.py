"""Every training objective on one config: validation quality and training speed.

    python benchmarks/objectives.py configs/ml100k.yaml --out runs/objectives

Trains one run per objective (the config's model and training options, with the
objective replaced), reads the best epoch's validation HR@10 / NDCG@10, and the
median training examples/s over epochs. Test metrics are written too but are not
what configurations should be chosen on. Writes ``objectives.json`` and
``objectives.md`` in --out.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import time
from pathlib import Path

from twotower.config import apply_overrides, load_config
from twotower.training.run import train_run

OBJECTIVES = {
    "pointwise": ["kind=pointwise", "num_negatives=3"],
    "hinge": ["kind=hinge", "margin=0.5", "num_negatives=8"],
    "logistic": ["kind=logistic", "sigma=10.0", "num_negatives=8"],
    "listwise": ["kind=listwise", "num_negatives=64"],
    "in_batch": ["kind=in_batch", "logq=counts"],
    "mixed": ["kind=mixed", "num_sampled=512", "logq=counts"],
    "full": ["kind=full"],
}


def objective_settings(name: str) -> list[str]:
    """``--set`` overrides that train with objective ``name``: one example per
    interaction first (a recipe trained one query at a time takes only the full
    softmax), then the objective's own settings."""
    return [
        "training.examples=interactions",
        *[f"training.objective.{s}" for s in OBJECTIVES[name]],
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("config", type=Path)
    parser.add_argument("--out", type=Path, default=Path("runs/objectives"))
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--only", action="append", help="run only these objectives")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    base = load_config(args.config, args.overrides)
    rows = {}
    for name, settings in OBJECTIVES.items():
        if args.only and name not in args.only:
            continue
        config = apply_overrides(base, objective_settings(name))
        clock = time.perf_counter()
        result = train_run(config, args.out / name)
        rates = [r["examples_per_s"] for r in result.state.records]
        rows[name] = {
            "settings": settings,
            "best_epoch": result.metrics["best_epoch"],
            "valid/hr@10": result.metrics["valid/hr@10"],
            "valid/ndcg@10": result.metrics["valid/ndcg@10"],
            "test/hr@10": result.metrics["test/hr@10"],
            "test/ndcg@10": result.metrics["test/ndcg@10"],
            "examples_per_s": statistics.median(rates),
            "seconds": time.perf_counter() - clock,
        }
        print(name, json.dumps(rows[name]), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "objectives.json").write_text(json.dumps(rows, indent=2))
    (args.out / "objectives.md").write_text(table(rows))
    print(table(rows))


def table(rows: dict[str, dict]) -> str:
    lines = [
        "| objective | valid HR@10 | valid NDCG@10 | best epoch | examples/s (median) |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, row in rows.items():
        lines.append(
            f"| {name} | {row['valid/hr@10']:.4f} | {row['valid/ndcg@10']:.4f} "
            f"| {row['best_epoch']} | {row['examples_per_s']:,.0f} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
