"""The next-item study: EASE's L2 chosen on validation, then the recipe against it on test.

    nice python benchmarks/next_item.py ease [--datasets toys,sports,ml100k]
        [--l2 10,30,100,300,1000,3000] [--ledger benchmarks/results/next-item/ease.jsonl]
    nice python benchmarks/next_item.py valid --variants NAME,... [--datasets toys]
        [--seeds 0] [--ledger benchmarks/results/next-item/valid.jsonl] [--out runs/next-item]
    nice python benchmarks/next_item.py test [--datasets toys,sports,ml100k] [--seeds 0,1,2]
        [--ledger benchmarks/results/next-item/test.jsonl] [--out runs/next-item]

Every dataset is split leave-last-out (each user's last item is test, the one before it
validation). ``ease`` fits EASE on each dataset's training part for every L2 of the grid
and ranks the validation items: one ledger line per (dataset, L2) with its validation
metrics; nothing reads test. ``test`` then ranks test once with EASE at the L2 that
won on validation NDCG@10 (refitted on train + validation, as every baseline is for
test), and trains the shipped recipe (``configs/next-item.yaml``, pointed at each
dataset) for each seed: one ledger line per (dataset, model, seed) with its test
metrics, drawn as a table (``next-item.md``) and a plot. ``valid`` trains named
variants (``VARIANTS_FILE``: each a list of config overrides on top of the search's
starting point, ``START``) and records their validation metrics alone, to choose the
recipe by: the runs rank test too, but no test metric reaches the ledger. A rerun skips
what its ledger holds and continues a killed run from its last checkpoint, so a
killed study resumes.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import numpy as np
import yaml
from tqdm import tqdm

from twotower.baselines.config import BaselinesConfig
from twotower.baselines.run import evaluate_baseline
from twotower.config import Config, load_config
from twotower.data.load import with_data_dir
from twotower.sources import open_source
from twotower.training.run import train_run

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ledgers import read, record, spread  # noqa: E402  (a sibling module)

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "next-item"
KS = (10, 20, 50)
METRICS = ("hr@10", "ndcg@10", "recall@10", "hr@20", "ndcg@20")
# the shipped recipe, which the test step trains
RECIPE = ROOT / "configs" / "next-item.yaml"
# the search's starting point, which the valid step's variants change (Amazon Toys)
START = ROOT / "benchmarks" / "spaces" / "next-item-start.yaml"
# the variant the recipe is: START with its overrides, and refit on for test
CHOSEN = "trial4-d4-mixed"
# Each dataset: the overrides that point a next-item config (Amazon Toys) at it.
DATASETS = {
    "toys": [],
    "sports": ["data.source=amazon-sports"],
    # the third check: the same recipe on MovieLens-100K, genres as the item attributes
    "ml100k": ["data.source=movielens-100k", "features.item.attributes.column=genres"],
}
BASELINES = ("pop", "ease")
# name -> the overrides that make the variant, for the ``valid`` step
VARIANTS_FILE = ROOT / "benchmarks" / "spaces" / "next-item-variants.yaml"


def dataset_config(
    name: str, data_dir: Path, overrides: list[str] = (), path: Path = RECIPE
) -> Config:
    """The config at ``path`` (the recipe) pointed at dataset ``name``, reading its folder
    under ``data_dir``."""
    config = load_config(path, [*DATASETS[name], *overrides])
    return dataclasses.replace(config, data=with_data_dir(config.data, data_dir))


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
            # a run the last stop killed goes on from its last epoch's checkpoint
            metrics = train_run(config, args.out / name / f"seed-{seed}", resume=True).metrics
            entry |= {"best_epoch": metrics["best_epoch"]}
        else:
            l2 = chosen_l2(args.ease_ledger, name)
            source = open_source(dataset_config(name, args.data_dir))
            baselines = BaselinesConfig(ease_l2=l2)
            metrics = evaluate_baseline(model, source, KS, baselines, parts=("test",))
            entry |= {"l2": l2} if model == "ease" else {}
        record(args.ledger, entry | _kept(metrics, "test"))


def variants(path: Path, names: list[str]) -> dict[str, list[str]]:
    """The overrides of each variant ``names`` asks for, from the YAML mapping at ``path``:
    name -> a list of ``key=value``, or ``{from: OTHER, set: [key=value, ...]}`` for
    OTHER's overrides followed by its own (the later override of a key wins)."""
    known = yaml.safe_load(path.read_text()) or {}

    def resolve(name: str, seen: tuple[str, ...]) -> list[str]:
        if name not in known:
            raise SystemExit(f"{path}: no variant {name!r}; it has {', '.join(known)}")
        if name in seen:
            raise SystemExit(f"{path}: variant {name!r} derives from itself")
        value = known[name]
        if isinstance(value, dict) and set(value) <= {"from", "set"} and "from" in value:
            own = value.get("set", [])
            base = resolve(str(value["from"]), (*seen, name))
        else:
            own, base = value, []
        if not isinstance(own, list) or not all(isinstance(o, str) for o in own):
            raise SystemExit(
                f"{path}: variant {name!r} must be a list of 'key=value' strings, "
                "or {from: OTHER, set: [...]}"
            )
        return [*base, *own]

    return {name: resolve(name, ()) for name in names}


def valid_rows(datasets: list[str], seeds: list[int], args: argparse.Namespace) -> None:
    """The validation metrics of each (dataset, variant, seed) the ledger lacks; test is
    ranked by the run (it writes its metrics.json) but left out of the ledger."""
    chosen = variants(args.variants_file, args.variants.split(","))
    done = {(e["dataset"], e["variant"], e["seed"]) for e in read(args.ledger)}
    todo = [(d, v, s) for d in datasets for v in chosen for s in seeds]
    todo = [key for key in todo if key not in done]
    for name, variant, seed in tqdm(todo, desc="variants", unit="run", file=sys.stderr):
        overrides = [*chosen[variant], f"seed={seed}"]
        config = dataset_config(name, args.data_dir, overrides, START)
        folder = args.out / "valid" / name / variant / f"seed-{seed}"
        metrics = train_run(config, folder, resume=True).metrics  # a killed run goes on
        entry = {"dataset": name, "variant": variant, "seed": seed, "overrides": overrides}
        entry |= {"best_epoch": metrics["best_epoch"], "epochs": config.training.epochs}
        record(args.ledger, entry | _kept(metrics, "valid"))


def valid_table(entries: list[dict]) -> str:
    """Per dataset: each variant's validation metrics, mean ± std over its seeds, best
    NDCG@10 first."""
    lines = [
        "| dataset | variant | seeds | best epochs | " + " | ".join(METRICS) + " |",
        "|---|---|---:|---|" + "---:|" * len(METRICS),
    ]
    for name in dict.fromkeys(e["dataset"] for e in entries):
        groups = {}
        for e in entries:
            if e["dataset"] == name:
                groups.setdefault(e["variant"], []).append(e)
        ranked = sorted(
            groups.items(), key=lambda kv: -np.mean([e["valid/ndcg@10"] for e in kv[1]])
        )
        for variant, group in ranked:
            cells = [spread([e[f"valid/{m}"] for e in group]) for m in METRICS]
            epochs = ",".join(f"{e['best_epoch']}/{e['epochs']}" for e in group)
            lines.append(
                f"| {name} | {variant} | {len(group)} | {epochs} | " + " | ".join(cells) + " |"
            )
    return "\n".join(lines) + "\n"


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
            cells = [spread([e[f"test/{m}"] for e in group]) for m in METRICS]
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
    """The part's metrics of ``METRICS`` and every group's (``benchmarks/groups.py``
    draws those)."""
    kept = {f"{part}/{m}": metrics[f"{part}/{m}"] for m in METRICS}
    return kept | {k: v for k, v in metrics.items() if k.startswith(f"{part}/groups/")}


def arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("step", choices=["ease", "valid", "test"])
    parser.add_argument("--datasets", default=",".join(DATASETS))
    parser.add_argument("--l2", default="10,30,100,300,1000,3000")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--variants", help="valid: the variants to train, by name")
    parser.add_argument("--variants-file", type=Path, default=VARIANTS_FILE)
    parser.add_argument("--ledger", type=Path)
    parser.add_argument("--ease-ledger", type=Path, default=RESULTS / "ease.jsonl")
    parser.add_argument("--out", type=Path, default=Path("runs/next-item"))
    parser.add_argument("--data-dir", type=Path, default=ROOT.parent / "shared" / "datasets")
    args = parser.parse_args()
    unknown = set(args.datasets.split(",")) - set(DATASETS)
    if unknown:
        parser.error(f"--datasets: unknown {sorted(unknown)}; known: {', '.join(DATASETS)}")
    if args.step == "valid" and not args.variants:
        parser.error("valid: --variants names the variants to train")
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
    elif args.step == "valid":
        args.ledger = args.ledger or RESULTS / "valid.jsonl"
        valid_rows(datasets, [int(s) for s in args.seeds.split(",")], args)
        entries = read(args.ledger)
        (args.ledger.parent / "valid.md").write_text(valid_table(entries))
        print(valid_table(entries))
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
