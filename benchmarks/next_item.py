"""The next-item study: EASE's L2 chosen on validation, then the recipe against it on test.

    nice python benchmarks/next_item.py ease [--datasets toys,sports,ml100k]
        [--l2 10,30,100,300,1000,3000] [--ledger benchmarks/results/next-item/ease.jsonl]
    nice python benchmarks/next_item.py test [--datasets toys,sports,ml100k] [--seeds 0,1,2]
        [--ledger benchmarks/results/next-item/test.jsonl] [--out runs/next-item]

Every dataset is split leave-last-out (each user's last item is test, the one before it
validation). ``ease`` fits EASE on each dataset's training part for every L2 of the grid
and ranks the validation items: one ledger line per (dataset, L2) with its validation
metrics; nothing reads test. ``test`` then ranks test once with EASE at the L2 that
won on validation NDCG@10 (refitted on train + validation, as every baseline is for
test), and trains the shipped recipe (``configs/next-item.yaml``, pointed at each
dataset) for each seed: one ledger line per (dataset, model, seed) with its test
metrics, drawn as a table (``next-item.md``) and a plot. A rerun skips what its ledger
holds, so a killed study resumes.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import numpy as np
from tqdm import tqdm

from twotower.baselines.config import BaselinesConfig
from twotower.baselines.run import evaluate_baseline
from twotower.config import Config, load_config
from twotower.data.load import with_data_dir
from twotower.sources import open_source
from twotower.training.run import train_run

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "next-item"
KS = (10, 20, 50)
METRICS = ("hr@10", "ndcg@10", "recall@10", "hr@20", "ndcg@20")
# Each dataset: the config it starts from and the overrides that point it there.
DATASETS = {
    "toys": ("configs/next-item.yaml", []),
    "sports": ("configs/next-item.yaml", ["data.source=amazon-sports"]),
    # the third check: the same recipe on MovieLens-100K, genres as the item attributes
    "ml100k": (
        "configs/next-item.yaml",
        ["data.source=movielens-100k", "features.item.attributes.column=genres"],
    ),
}
BASELINES = ("pop", "ease")


def dataset_config(name: str, data_dir: Path, overrides: list[str] = ()) -> Config:
    """The config of dataset ``name``, reading its folder under ``data_dir``."""
    path, own = DATASETS[name]
    config = load_config(ROOT / path, [*own, *overrides])
    return dataclasses.replace(config, data=with_data_dir(config.data, data_dir))


def read(ledger: Path) -> list[dict]:
    return (
        [json.loads(line) for line in ledger.read_text().splitlines()] if ledger.is_file() else []
    )


def record(ledger: Path, entry: dict) -> None:
    ledger.parent.mkdir(parents=True, exist_ok=True)
    with ledger.open("a") as handle:
        handle.write(json.dumps(entry) + "\n")


def ease_sweep(datasets: list[str], grid: list[float], data_dir: Path, ledger: Path) -> None:
    """EASE's validation metrics for each (dataset, L2) the ledger lacks."""
    done = {(e["dataset"], e["l2"]) for e in read(ledger)}
    todo = [(d, l2) for d in datasets for l2 in grid if (d, l2) not in done]
    sources = {}
    for name, l2 in tqdm(todo, desc="EASE on validation", unit="fit", file=sys.stderr):
        if name not in sources:
            sources[name] = open_source(dataset_config(name, data_dir))
        metrics = evaluate_baseline(
            "ease", sources[name], KS, BaselinesConfig(ease_l2=l2), parts=("valid",)
        )
        record(ledger, {"dataset": name, "l2": l2} | _kept(metrics, "valid"))


def chosen_l2(ledger: Path, dataset: str) -> float:
    """The L2 of the best validation NDCG@10 the sweep found for ``dataset``."""
    entries = [e for e in read(ledger) if e["dataset"] == dataset]
    if not entries:
        raise SystemExit(f"{ledger}: no EASE sweep for {dataset}; run the 'ease' step first")
    return max(entries, key=lambda e: e["valid/ndcg@10"])["l2"]


def test_rows(datasets: list[str], seeds: list[int], args: argparse.Namespace) -> None:
    """The test metrics of the baselines (EASE at its chosen L2) and of the recipe's
    seeds, for each (dataset, model, seed) the ledger lacks."""
    done = {(e["dataset"], e["model"], e["seed"]) for e in read(args.ledger)}
    todo = [(d, m, 0) for d in datasets for m in BASELINES]
    todo += [(d, "recipe", s) for d in datasets for s in seeds]
    todo = [key for key in todo if key not in done]
    for name, model, seed in tqdm(todo, desc="test rows", unit="run", file=sys.stderr):
        entry = {"dataset": name, "model": model, "seed": seed}
        if model == "recipe":
            config = dataset_config(name, args.data_dir, [f"seed={seed}"])
            metrics = train_run(config, args.out / name / f"seed-{seed}").metrics
            entry |= {"best_epoch": metrics["best_epoch"]}
        else:
            l2 = chosen_l2(args.ease_ledger, name)
            source = open_source(dataset_config(name, args.data_dir))
            baselines = BaselinesConfig(ease_l2=l2)
            metrics = evaluate_baseline(model, source, KS, baselines, parts=("test",))
            entry |= {"l2": l2} if model == "ease" else {}
        record(args.ledger, entry | _kept(metrics, "test"))


def table(entries: list[dict]) -> str:
    """Per dataset: each model's test metrics (the recipe's mean ± std over seeds) and
    the recipe's lift over EASE."""
    lines = [
        "| dataset | model | seeds | " + " | ".join(METRICS) + " |",
        "|---|---|---:|" + "---:|" * len(METRICS),
    ]
    for name in dict.fromkeys(e["dataset"] for e in entries):
        rows = {
            m: [e for e in entries if e["dataset"] == name and e["model"] == m]
            for m in (*BASELINES, "recipe")
        }
        for model, group in rows.items():
            if not group:
                continue
            cells = []
            for metric in METRICS:
                values = np.array([e[f"test/{metric}"] for e in group])
                spread = f" ± {values.std():.4f}" if len(values) > 1 else ""
                cells.append(f"{values.mean():.4f}{spread}")
            label = f"EASE (L2 {group[0]['l2']:g})" if model == "ease" else model
            lines.append(f"| {name} | {label} | {len(group)} | " + " | ".join(cells) + " |")
        if rows["recipe"] and rows["ease"]:
            lift = [
                np.mean([e[f"test/{m}"] for e in rows["recipe"]]) / rows["ease"][0][f"test/{m}"] - 1
                for m in METRICS
            ]
            lines.append(
                f"| {name} | recipe over EASE | | " + " | ".join(f"{v:+.1%}" for v in lift) + " |"
            )
    return "\n".join(lines) + "\n"


def plot(entries: list[dict], path: Path) -> None:
    """Test HR@10 and NDCG@10 of each model per dataset (the recipe: mean and seeds)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    datasets = list(dict.fromkeys(e["dataset"] for e in entries))
    models = (*BASELINES, "recipe")
    figure, axes = plt.subplots(1, 2, figsize=(11, 4))
    for axis, metric in zip(axes, ("hr@10", "ndcg@10"), strict=True):
        for offset, model in enumerate(models):
            for x, name in enumerate(datasets):
                values = [
                    e[f"test/{metric}"]
                    for e in entries
                    if e["dataset"] == name and e["model"] == model
                ]
                if values:
                    position = x + (offset - 1) * 0.27
                    axis.bar(
                        position,
                        np.mean(values),
                        0.25,
                        color=f"C{offset}",
                        label=model if x == 0 else None,
                    )
                    axis.scatter([position] * len(values), values, color="black", s=8)
        axis.set_xticks(range(len(datasets)), datasets)
        axis.set_ylabel(f"test {metric}, leave-last-out")
        axis.legend()
        axis.grid(alpha=0.3, axis="y")
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)


def _kept(metrics: dict, part: str) -> dict:
    return {f"{part}/{m}": metrics[f"{part}/{m}"] for m in METRICS}


def arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("step", choices=["ease", "test"])
    parser.add_argument("--datasets", default=",".join(DATASETS))
    parser.add_argument("--l2", default="10,30,100,300,1000,3000")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--ledger", type=Path)
    parser.add_argument("--ease-ledger", type=Path, default=RESULTS / "ease.jsonl")
    parser.add_argument("--out", type=Path, default=Path("runs/next-item"))
    parser.add_argument("--data-dir", type=Path, default=ROOT.parent / "shared" / "datasets")
    args = parser.parse_args()
    unknown = set(args.datasets.split(",")) - set(DATASETS)
    if unknown:
        parser.error(f"--datasets: unknown {sorted(unknown)}; known: {', '.join(DATASETS)}")
    return args


def main() -> None:
    args = arguments()
    datasets = args.datasets.split(",")
    if args.step == "ease":
        grid = [float(v) for v in args.l2.split(",")]
        ease_sweep(datasets, grid, args.data_dir, args.ledger or args.ease_ledger)
        for name in datasets:
            print(
                f"{name}: EASE L2 chosen on validation NDCG@10: {chosen_l2(args.ease_ledger, name)}"
            )
    else:
        args.ledger = args.ledger or RESULTS / "test.jsonl"
        test_rows(datasets, [int(s) for s in args.seeds.split(",")], args)
        entries = read(args.ledger)
        (args.ledger.parent / "next-item.md").write_text(table(entries))
        plot(entries, args.ledger.parent / "next-item.png")
        print(table(entries))


if __name__ == "__main__":
    np.set_printoptions(precision=4)
    main()
