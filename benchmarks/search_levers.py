"""Levers on the latest-small search recipe, through the library, on validation only.

    python benchmarks/search_levers.py \
        --ledger benchmarks/results/tuning/ml-latest-small-search/levers.jsonl \
        [--data-dir DIR] [--levers base,history,...] [--seeds 0,1,2,3,4] [--threads 1]
        [--out runs/search-levers] [--set KEY=VALUE ...]

Each lever is ``configs/ml-latest-small-search.yaml`` with features added to a side
and ``--set``-style overrides (``LEVERS``), trained by ``twotower.training.run`` without
the refit: its number is the best epoch's validation Recall@10, what the recipe is
chosen on. Each finished (lever, seed) is one line of the ledger (the lever's changes,
best epoch, the validation metrics, CPU-minutes) and is not run again; a killed run
resumes from its folder under ``--out``. Only ``valid/`` metrics are kept or printed.
``--set`` applies to every lever (``training.epochs=1`` for a quick look; what it
sets is recorded in each line).
At the end the whole ledger is drawn beside EASE's validation metrics into
``levers.png`` next to the ledger (a run that records nothing new leaves it as it is).
"""

from __future__ import annotations

import dataclasses
import sys
import time
from pathlib import Path

import yaml

from twotower.baselines.run import evaluate_baseline
from twotower.config import Config
from twotower.config_io import apply_overrides, from_dict
from twotower.data.load import with_data_dir
from twotower.sources import MemorySource, load_data
from twotower.training.checkpoint import CheckpointStore
from twotower.training.run import train_run

sys.path.insert(0, str(Path(__file__).parent))
from levers_ledger import arguments, plot, record, recorded  # noqa: E402  (the ledger, shared)

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "configs" / "ml-latest-small-search.yaml"

# the tag's known movies as a query-side history, sharing a movie-id table with the item
# tower; every training example's own movie masked out of it
HISTORY = {
    "query": [
        {
            "name": "history",
            "kind": "history",
            "column": "query",
            "item_feature": "item_id",
            "max_len": 100,
        }
    ],
    "item": [{"name": "item_id", "kind": "id", "column": "item_id", "dim": 64}],
    "set": ["training.history=mask_target"],
}
# one example per tag: each epoch 40% of its training movies held out of the history as
# positives, scored by a softmax over every movie but the tag's other training movies
QUERY_LEVEL = [
    "training.objective={kind: full, mask_known: true}",
    "training.examples=queries",
    "training.holdout=0.4",
    "training.position_weights=position",
]


def _with(base: dict, **more: list) -> dict:
    return {key: [*base.get(key, []), *more.get(key, [])] for key in ("query", "item", "set")}


LEVERS: dict[str, dict[str, list]] = {
    "base": {},
    "history": HISTORY,
    "history-item-bias": _with(HISTORY, set=["model.item_bias=true"]),
    "history-dropout-0.5": _with(HISTORY, set=["features.query.history.item_dropout=0.5"]),
    "item-bias": {"set": ["model.item_bias=true"]},
    # a learned vector per tag beside its text (every evaluated tag is seen in training)
    "query-id": {"query": [{"name": "query_id", "kind": "id", "column": "query", "dim": 64}]},
    "cosine-30": {
        "set": ["training.lr_schedule=cosine", "training.epochs=30", "training.patience=30"]
    },
    "history-query-level": {**HISTORY, "set": QUERY_LEVEL},
}


def lever_config(
    name: str, seed: int, data_dir: Path | None, threads: int, extra: list[str] = ()
) -> Config:
    """The recipe with lever ``name``'s features and settings, without the refit."""
    lever = LEVERS[name]
    raw = yaml.safe_load(RECIPE.read_text())
    raw["features"]["query"] += lever.get("query", [])
    raw["features"]["item"] += lever.get("item", [])
    settings = [
        *lever.get("set", []),
        "training.refit=false",
        "training.tensorboard=false",
        *extra,
        f"seed={seed}",
        f"threads={threads}",
    ]
    # paths resolve against configs/, as when the recipe itself is loaded
    config = apply_overrides(from_dict(Config, raw, where="", base_dir=RECIPE.parent), settings)
    if data_dir is None:
        return config
    return dataclasses.replace(config, data=with_data_dir(config.data, data_dir))


def main() -> None:
    more = [
        ("--out", {"type": Path, "default": ROOT / "runs" / "search-levers"}),
        ("--set", {"action": "append", "default": [], "dest": "settings"}),
    ]
    args = arguments(__doc__.split("\n\n")[0], LEVERS, "0,1,2,3,4", more)
    done = recorded(args.ledger)
    figure = args.ledger.parent / "levers.png"
    fresh = 0

    for name in args.levers.split(","):
        for seed in (int(s) for s in args.seeds.split(",")):
            if (name, seed) in done:
                continue
            config = lever_config(name, seed, args.data_dir, args.threads, args.settings)
            folder = args.out / f"{name}-s{seed}"
            resume = CheckpointStore(folder / "checkpoints").exists("last")
            clock = time.process_time()
            metrics = train_run(config, folder, resume=resume).metrics
            entry = {
                "lever": name,
                "seed": seed,
                **LEVERS[name],
                **({"also_set": args.settings} if args.settings else {}),
                "best_epoch": metrics["best_epoch"],
                **{key: value for key, value in metrics.items() if key.startswith("valid/")},
                "cpu_minutes": round((time.process_time() - clock) / 60, 2),
            }
            record(args.ledger, entry)
            fresh += 1

    if not fresh and figure.is_file():  # EASE again would draw the same figure
        print(f"nothing new in {args.ledger}; {figure} is as it was")
        return
    config = lever_config("base", 0, args.data_dir, args.threads)
    dataset, split = load_data(config)
    ease = evaluate_baseline(
        "ease", MemorySource(dataset, split), [10], config.baselines, parts=("valid",)
    )
    title = "latest-small search: levers on the recipe (bar: mean; dots: seeds)"
    plot(args.ledger, ease, figure, title)


if __name__ == "__main__":
    sys.exit(main())
