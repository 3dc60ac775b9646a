"""New items on MovieLens-100K: the item id's dropout chosen on validation, then test.

    nice python benchmarks/new_items.py valid [--rates 0,0.1,0.25,0.5] [--seeds 0]
        [--splits new-items,shipped] [--ledger benchmarks/results/new-items/valid.jsonl]
    nice python benchmarks/new_items.py test --rate P [--seeds 0,1,2]
        [--ledger benchmarks/results/new-items/test.jsonl]

Two splits of ``configs/ml100k.yaml`` (leave-last-out by time, the recipe's features):
``new-items`` holds a tenth of the movies out of training for test
(``split.new_items``) and another tenth for validation (``split.new_items_valid``),
every rating of theirs in that part; ``shipped`` is the recipe's own split, on which
it was chosen. ``valid`` trains the recipe with ``features.item.item_id.dropout`` at
each rate, seed and split the ledger lacks and records validation alone (the whole
part, and on ``new-items`` its new movies alone): one line per run, nothing of test.
``test`` then reads test from the ``new-items`` runs of rate 0 and ``--rate`` (the
runs ``valid`` trained, or trains them) and ranks the baselines (popularity,
item-KNN, EASE at their defaults) on the same split: one line per (model, seed), drawn
as a table (``new-items.md``). A rerun skips what its ledger holds, so a killed study
resumes. Every run has one thread (``threads=1``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

from tqdm import tqdm

from twotower.baselines.run import evaluate_baseline
from twotower.config import Config, load_config
from twotower.data.load import with_data_dir
from twotower.sources import open_source
from twotower.threads import set_threads
from twotower.training.run import train_run

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ledgers import read, record, spread  # noqa: E402  (a sibling module)

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "new-items"
CONFIG = ROOT / "configs" / "ml100k.yaml"
SPLITS = {
    "new-items": ["split.new_items=0.1", "split.new_items_valid=0.1"],
    "shipped": [],
}
METRICS = ("recall@10", "ndcg@10", "hr@10", "recall@50", "recall@100")
KS = (10, 50, 100)  # the recipe's own cutoffs
ALONE = ("", "new_items/", "known_items/")  # the whole part, its new items, the others
BASELINES = {"pop": "popularity", "itemknn": "item-KNN", "ease": "EASE"}


def run_config(split: str, rate: float, seed: int, data_dir: Path) -> Config:
    """The recipe on ``split`` with the item id's dropout at ``rate``, seed ``seed``."""
    overrides = [*SPLITS[split], f"features.item.item_id.dropout={rate}", f"seed={seed}"]
    config = load_config(CONFIG, [*overrides, "threads=1"])
    return dataclasses.replace(config, data=with_data_dir(config.data, data_dir))


def run_metrics(split: str, rate: float, seed: int, args: argparse.Namespace) -> dict:
    """A run's final metrics (valid and test), from its folder if it finished, else
    trained now (from its last checkpoint, if a killed study left one)."""
    out = args.out / split / f"dropout-{rate:g}" / f"seed-{seed}"
    if (out / "metrics.json").is_file():
        return json.loads((out / "metrics.json").read_text())
    return train_run(run_config(split, rate, seed, args.data_dir), out, resume=True).metrics


def kept(metrics: dict, part: str) -> dict:
    """The part's METRICS, over the whole part and (where reported) its new items
    alone and its other items alone."""
    names = [f"{part}/{alone}{m}" for alone in ALONE for m in (*METRICS, "queries")]
    return {name: metrics[name] for name in names if name in metrics}


def valid_rows(args: argparse.Namespace) -> None:
    """Validation metrics of every (split, rate, seed) the ledger lacks."""
    done = {(e["split"], e["dropout"], e["seed"]) for e in read(args.ledger)}
    todo = [
        (split, rate, seed)
        for split in args.splits
        for seed in args.seeds
        for rate in args.rates
        if (split, rate, seed) not in done
    ]
    for split, rate, seed in tqdm(todo, desc="validation runs", unit="run", file=sys.stderr):
        metrics = run_metrics(split, rate, seed, args)
        entry = {"split": split, "dropout": rate, "seed": seed, "best_epoch": metrics["best_epoch"]}
        record(args.ledger, entry | kept(metrics, "valid"))


def test_rows(args: argparse.Namespace) -> None:
    """Test metrics of the baselines and of the runs at rate 0 and ``args.rate`` on the
    ``new-items`` split, for each (model, seed) the ledger lacks."""
    done = {(e["model"], e["seed"]) for e in read(args.ledger)}
    todo = [(name, 0) for name in BASELINES]
    todo += [(f"dropout {rate:g}", seed) for rate in (0.0, args.rate) for seed in args.seeds]
    todo = [key for key in todo if key not in done]
    for model, seed in tqdm(todo, desc="test rows", unit="run", file=sys.stderr):
        if model in BASELINES:
            config = run_config("new-items", 0.0, 0, args.data_dir)
            source = open_source(config)
            metrics = evaluate_baseline(model, source, KS, config.baselines, parts=("test",))
        else:
            metrics = run_metrics("new-items", float(model.split()[1]), seed, args)
        record(args.ledger, {"model": model, "seed": seed} | kept(metrics, "test"))


def valid_table(entries: list[dict]) -> str:
    """Per split and rate: validation NDCG@10 and Recall@10 (mean ± std over seeds),
    the whole part and its new items."""
    columns = ["ndcg@10", "recall@10", "new_items/ndcg@10", "new_items/recall@10"]
    lines = [
        "| split | dropout | seeds | " + " | ".join(f"valid {c}" for c in columns) + " |",
        "|---|---:|---:|" + "---:|" * len(columns),
    ]
    for split in dict.fromkeys(e["split"] for e in entries):
        for rate in sorted({e["dropout"] for e in entries if e["split"] == split}):
            group = [e for e in entries if e["split"] == split and e["dropout"] == rate]
            cells = [spread([e.get(f"valid/{c}") for e in group]) for c in columns]
            lines.append(f"| {split} | {rate:g} | {len(group)} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def test_table(entries: list[dict]) -> str:
    """Each model's test metrics on the new items alone, on the other items alone, then
    on the whole part."""
    lines = []
    for title, prefix in (
        ("new items alone", "test/new_items/"),
        ("the other items alone", "test/known_items/"),
        ("whole test", "test/"),
    ):
        lines += [
            f"\n{title}:\n",
            "| model | seeds | " + " | ".join(METRICS) + " |",
            "|---|---:|" + "---:|" * len(METRICS),
        ]
        for model in dict.fromkeys(e["model"] for e in entries):
            group = [e for e in entries if e["model"] == model]
            cells = [spread([e[f"{prefix}{m}"] for e in group]) for m in METRICS]
            label = BASELINES.get(model) or f"two-tower, item_id {model}"
            lines.append(f"| {label} | {len(group)} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("step", choices=["valid", "test"])
    parser.add_argument("--rates", default="0,0.1,0.25,0.5")
    parser.add_argument("--rate", type=float, help="test: the rate chosen on validation")
    parser.add_argument("--seeds", default=None, help="valid: 0; test: 0,1,2")
    parser.add_argument("--splits", default=",".join(SPLITS))
    parser.add_argument("--ledger", type=Path)
    parser.add_argument("--out", type=Path, default=Path("runs/new-items"))
    parser.add_argument("--data-dir", type=Path, default=ROOT.parent / "shared" / "datasets")
    args = parser.parse_args()
    if args.step == "test" and args.rate is None:
        parser.error("test needs --rate, the dropout chosen on validation")
    args.rates = [float(v) for v in args.rates.split(",")]
    args.seeds = [
        int(s) for s in (args.seeds or ("0" if args.step == "valid" else "0,1,2")).split(",")
    ]
    args.splits = args.splits.split(",")
    unknown = set(args.splits) - set(SPLITS)
    if unknown:
        parser.error(f"--splits: unknown {sorted(unknown)}; known: {', '.join(SPLITS)}")
    return args


def main() -> None:
    args = arguments()
    set_threads(1)  # the baselines' (each run sets its own, threads=1)
    if args.step == "valid":
        args.ledger = args.ledger or RESULTS / "valid.jsonl"
        valid_rows(args)
        print(valid_table(read(args.ledger)))
    else:
        args.ledger = args.ledger or RESULTS / "test.jsonl"
        test_rows(args)
        text = test_table(read(args.ledger))
        (args.ledger.parent / "new-items.md").write_text(text)
        print(text)


if __name__ == "__main__":
    main()
