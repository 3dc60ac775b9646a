"""The ledger of a levers study (``ml1m_levers.py``, ``search_levers.py``): one JSON line
per finished (lever, seed) with its validation metrics, read back so nothing runs twice,
and drawn beside EASE's validation metrics."""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np


def arguments(
    description: str, levers: dict, seeds: str, more: Sequence[tuple[str, dict]] = ()
) -> argparse.Namespace:
    """The command line both studies share (``--ledger``, ``--data-dir``, ``--levers``,
    ``--seeds``, ``--threads``) and ``more`` of the caller's; an unknown lever is an
    error naming the known ones."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--ledger", type=Path, required=True)
    parser.add_argument("--data-dir", type=Path, default=None)
    parser.add_argument("--levers", default=",".join(levers))
    parser.add_argument("--seeds", default=seeds)
    parser.add_argument("--threads", type=int, default=1)
    for flag, options in more:
        parser.add_argument(flag, **options)
    args = parser.parse_args()
    unknown = [name for name in args.levers.split(",") if name not in levers]
    if unknown:
        parser.error(f"unknown lever(s) {unknown}; known: {', '.join(levers)}")
    return args


def recorded(ledger: Path) -> set[tuple[str, int]]:
    """The (lever, seed) pairs the ledger already holds."""
    lines = ledger.read_text().splitlines() if ledger.is_file() else []
    return {(entry["lever"], entry["seed"]) for entry in map(json.loads, lines)}


def record(ledger: Path, entry: dict) -> None:
    """Appends one finished run (``lever``, ``seed``, ``best_epoch``, ``valid/...``) and
    prints its line."""
    ledger.parent.mkdir(parents=True, exist_ok=True)
    with ledger.open("a") as handle:
        handle.write(json.dumps(entry) + "\n")
    print(
        f"{entry['lever']} s{entry['seed']}: valid recall@10 {entry['valid/recall@10']:.4f}, "
        f"ndcg@10 {entry['valid/ndcg@10']:.4f} (epoch {entry['best_epoch']})",
        flush=True,
    )


def plot(ledger: Path, ease: dict, out: Path, title: str) -> None:
    """Each lever's validation Recall@10 and NDCG@10 (mean, and each seed as a dot),
    beside ``ease``'s (``evaluate_baseline``'s ``valid/...`` metrics)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    entries = [json.loads(line) for line in ledger.read_text().splitlines()]
    names = list(dict.fromkeys(entry["lever"] for entry in entries))
    fig, axes = plt.subplots(1, 2, figsize=(12, 0.45 * len(names) + 1.5), sharey=True)
    for axis, metric in zip(axes, ("recall@10", "ndcg@10"), strict=True):
        for row, name in enumerate(names):
            values = [e[f"valid/{metric}"] for e in entries if e["lever"] == name]
            axis.barh(row, np.mean(values), color="tab:blue", alpha=0.6)
            axis.plot(values, [row] * len(values), "k.", markersize=4)
        reference = ease[f"valid/{metric}"]
        axis.axvline(reference, color="tab:red", linestyle="--", label="EASE")
        low = min(reference, *(e[f"valid/{metric}"] for e in entries))
        axis.set_xlim(low * 0.97, max(reference, *(e[f"valid/{metric}"] for e in entries)) * 1.01)
        axis.set_xlabel(f"valid {metric}")
        axis.legend(loc="lower right")
    axes[0].set_yticks(range(len(names)), names)
    axes[0].invert_yaxis()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
