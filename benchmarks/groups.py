"""Test metrics by group for the shipped recipes and the baselines: rare items, few
interactions.

    nice python benchmarks/groups.py run [--datasets ml100k,ml1m] [--seeds 0,1,2]
        [--ledger benchmarks/results/groups/ledger.jsonl] [--out runs/groups] [--threads 2]
    python benchmarks/groups.py table [--ledger ...]
        [--next-item benchmarks/results/next-item/test.jsonl]

``run`` trains each dataset's shipped recipe (``configs/<dataset>.yaml``, untouched) for
every seed and ranks test once with popularity, item-KNN and EASE (the recipe's own
``baselines`` settings; refitted on train + validation as for every test row). Each
finished (dataset, model, seed) is one ledger line holding the test metrics overall and
by group (``twotower.evaluation.groups``: items by their share of the training
interactions, head the first 20%, tail the last 20%; queries by activity terciles); a
rerun skips what the ledger holds and resumes a stopped training. Nothing is chosen
here: the recipes were chosen on validation before.

``table`` draws the ledger (and the next-item study's ledger, whose lines carry the same
keys) as ``groups.md``, one table per dataset, and one bar chart of NDCG@10 by group per
dataset (``groups-<dataset>.png``).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import numpy as np
from tqdm import tqdm

from twotower.baselines.run import evaluate_baseline
from twotower.config import load_config
from twotower.data.load import with_data_dir
from twotower.evaluation.report import GROUPS, plot_groups
from twotower.sources import open_source
from twotower.training.checkpoint import CheckpointStore
from twotower.training.run import train_run

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ledgers import read, record  # noqa: E402  (a sibling module)

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "groups"
DATASETS = {"ml100k": "configs/ml100k.yaml", "ml1m": "configs/ml1m.yaml"}
BASELINES = ("pop", "itemknn", "ease")
MODELS = (*BASELINES, "recipe")
KS = [10, 20, 50]
# what a table shows for each group: the two tops-of-list metrics and, for item
# groups, how much of the top 10 the group's items take (popularity bias)
SHOWN = ("recall@10", "ndcg@10")


def kept(metrics: dict[str, float]) -> dict[str, float]:
    """The test metrics a ledger line keeps: overall and every group's."""
    return {k: v for k, v in metrics.items() if k.startswith("test/")}


def run(args: argparse.Namespace) -> None:
    """Every (dataset, model, seed) the ledger lacks: baselines once, the recipe per seed."""
    done = {(e["dataset"], e["model"], e["seed"]) for e in read(args.ledger)}
    seeds = [int(s) for s in args.seeds.split(",")]
    todo = [(d, m, 0) for d in args.datasets.split(",") for m in BASELINES]
    todo += [(d, "recipe", s) for d in args.datasets.split(",") for s in seeds]
    todo = [key for key in todo if key not in done]
    for name, model, seed in tqdm(todo, desc="group rows", unit="run", file=sys.stderr):
        settings = [f"training.ks={KS}", "training.tensorboard=false", f"seed={seed}"]
        settings += [f"threads={args.threads}"]
        config = load_config(ROOT / DATASETS[name], settings)
        if args.data_dir is not None:
            config = dataclasses.replace(config, data=with_data_dir(config.data, args.data_dir))
        if model == "recipe":
            folder = args.out / name / f"seed-{seed}"
            resume = CheckpointStore(folder / "checkpoints").exists("last")
            metrics = train_run(config, folder, resume=resume).metrics
        else:
            source = open_source(config)
            metrics = evaluate_baseline(model, source, KS, config.baselines, parts=("test",))
        record(args.ledger, {"dataset": name, "model": model, "seed": seed} | kept(metrics))


def _mean(entries: list[dict], key: str) -> float:
    values = [e[key] for e in entries if key in e]
    return float(np.mean(values)) if values else float("nan")


def table(entries: list[dict], dataset: str) -> str:
    """One dataset's markdown table: a row per model (the recipe: mean over its seeds),
    each cell recall@10 / ndcg@10, overall and per group, then the tail items' share of
    the top 10 and the catalogue's coverage@10."""
    groups = [g for g in GROUPS if any(f"test/groups/{g}/queries" in e for e in entries)]
    models = dict.fromkeys([*MODELS, *(e["model"] for e in entries)])
    header = ["model", "seeds", "all", *groups, "tail share@10", "coverage@10"]
    lines = [
        f"**{dataset}**, test, recall@10 / ndcg@10. Training counts: "
        + ", ".join(_counts(entries[0], g) for g in groups)
        + ".",
        "",
        "| " + " | ".join(header) + " |",
        "|---|---:|" + "---:|" * (len(header) - 2),
    ]
    for model in models:
        rows = [e for e in entries if e["model"] == model]
        if not rows:
            continue
        cells = [_pair(rows, "test/")] + [_pair(rows, f"test/groups/{g}/") for g in groups]
        cells += [
            f"{_mean(rows, 'test/groups/item:tail/share@10'):.4f}",
            f"{_mean(rows, 'test/coverage@10'):.4f}",
        ]
        lines.append(f"| {model} | {len(rows)} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _pair(rows: list[dict], prefix: str) -> str:
    return " / ".join(f"{_mean(rows, prefix + m):.4f}" for m in SHOWN)


def _counts(entry: dict, group: str) -> str:
    low = entry.get(f"test/groups/{group}/min_count")
    high = entry.get(f"test/groups/{group}/max_count")
    if low is None:
        return group
    return f"{group} {low:.0f}" if low == high else f"{group} {low:.0f}-{high:.0f}"


def draw(args: argparse.Namespace) -> None:
    """``groups.md`` and a chart per dataset from the ledgers."""
    entries = read(args.ledger) + read(args.next_item)
    datasets = list(dict.fromkeys(e["dataset"] for e in entries))
    parts = []
    for name in datasets:
        own = [e for e in entries if e["dataset"] == name and "test/groups/item:head/queries" in e]
        if not own:
            continue
        parts.append(table(own, name))
        runs = {
            model: {
                k: _mean([e for e in own if e["model"] == model], k)
                for k in own[0]
                if k.startswith("test/")
            }
            for model in dict.fromkeys(e["model"] for e in own)
        }
        plot_groups(runs, "test", "ndcg@10", args.ledger.parent / f"groups-{name}.png")
    (args.ledger.parent / "groups.md").write_text("\n".join(parts))
    print("\n".join(parts))


def arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("step", choices=["run", "table"])
    parser.add_argument("--datasets", default=",".join(DATASETS))
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--ledger", type=Path, default=RESULTS / "ledger.jsonl")
    parser.add_argument(
        "--next-item", type=Path, default=ROOT / "benchmarks/results/next-item/test.jsonl"
    )
    parser.add_argument("--out", type=Path, default=Path("runs/groups"))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--data-dir", type=Path, default=None)
    args = parser.parse_args()
    unknown = set(args.datasets.split(",")) - set(DATASETS)
    if unknown:
        parser.error(f"--datasets: unknown {sorted(unknown)}; known: {', '.join(DATASETS)}")
    return args


def main() -> None:
    args = arguments()
    if args.step == "run":
        run(args)
    draw(args)


if __name__ == "__main__":
    main()
