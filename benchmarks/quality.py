"""Retrieval quality on MovieLens: every objective, tower variants, three seeds, baselines.

    python benchmarks/quality.py --out runs/quality [--datasets ml100k,ml1m]
        [--seeds 0,1,2] [--variants mlp,dcn] [--objectives in_batch,...]
        [--data-dir DIR] [--ledger DIR] [--quick]

Protocols (full-corpus ranking, seen items excluded, ``docs/evaluation.md``):

- ``ml100k``: MovieLens-100K, per-user leave-last-out by time (``configs/ml100k.yaml``):
  HR@10, NDCG@10, HR@50.
- ``ml1m``: MovieLens-1M, ratings >= 3, per-user random 80/10/10
  (``configs/ml1m.yaml``, RecBole's ML-1M protocol): Recall@10, NDCG@10, MRR@10, Hit@10.
- ``search``: MovieLens latest-small as search, a tag's text the query and the movies it
  was applied to the relevant items, per-tag random 60/20/20
  (``configs/ml-latest-small-search.yaml``): Recall@10, NDCG@10, Recall@100.

Rows: popularity, item-KNN and EASE (fitted on train for validation, on train +
validation for test), and the two-tower model under each objective (``recipe``: the
config's own objective and settings, untouched: what a user running it gets) with each
tower variant (``mlp``: the recipe's towers as they are; ``dcn``: DCN-v2 towers of the same width;
``attention``, ``transformer``, ``gru``: the MLP towers with that history encoder
(``attention-time``: attention with time-gap buckets, where there are timestamps), the
last two trained in one pass (``training.examples: sequences``), with in_batch or
mixed only; ``interests-sa``, ``interests-routing``: a four-interest query tower,
self-attentive or routed), each
trained once per seed. A "best" row per objective takes the variant with the higher
mean *validation* metric (the recipe's early-stopping metric); test metrics are only
reported, never used to choose. Two-tower cells are mean ± standard deviation over
seeds.

``--quick`` runs a few minutes: 200 sampled users per dataset, one epoch, one seed,
the MLP variant. Writes ``quality.json``, ``quality.md`` and one bar chart per
dataset (``quality-<dataset>.png``) into ``--out``; each run's own folder (metrics,
curves, checkpoints) is under ``--out/<dataset>/`` (``<dataset>-quick/``). A run
finished earlier is read back and a stopped one resumed, so the suite can be run
again after an interruption. ``--ledger DIR`` also keeps each finished run's metrics as
``DIR/<dataset>/<run>.json`` and reads them back instead of training again: the record
of the published tables (``benchmarks/results/quality``). Each entry carries a digest of
the run's config (``recipe``); an entry whose digest differs from what today's config
gives that run stops the suite, naming the file, so a changed recipe never reuses old
numbers. The grid run before the recipe search (no digests) is kept under
``benchmarks/results/quality/before-tuning``, read with the configs of that time.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import statistics
import sys
from pathlib import Path

from twotower.baselines.run import evaluate_baseline
from twotower.config import Config, apply_overrides, load_config
from twotower.config_io import to_dict
from twotower.data.load import with_data_dir
from twotower.sources import MemorySource, load_data
from twotower.training.checkpoint import CheckpointStore
from twotower.training.run import METRICS_FILE, train_run

sys.path.insert(0, str(Path(__file__).parent))
from objectives import OBJECTIVES, objective_settings  # noqa: E402  (the objective settings, shared)

ROOT = Path(__file__).resolve().parent.parent
DATASETS = {
    "ml100k": (ROOT / "configs/ml100k.yaml", ["hr@10", "ndcg@10", "hr@50"]),
    "ml1m": (ROOT / "configs/ml1m.yaml", ["recall@10", "ndcg@10", "mrr@10", "hr@10"]),
    "search": (
        ROOT / "configs/ml-latest-small-search.yaml",
        ["recall@10", "ndcg@10", "recall@100"],
    ),
}
KS = [1, 5, 10, 20, 50, 100]
BASELINES = ("pop", "itemknn", "ease")
VARIANTS = {
    "mlp": [],
    "dcn": [
        f"model.{side}.{setting}"
        for side in ("query", "item")
        for setting in ("kind=dcn", "cross_layers=2", "widths=[256]", "dim=64")
    ],
    # the recipe's MLP towers with another history encoder (docs/training.md); the
    # sequence encoders train in one pass, so only beside in_batch and mixed
    "attention": ["features.query.history.encoder=attention"],
    # attention with time-gap buckets: log2 of hours to the latest item (needs timestamps)
    "attention-time": [
        "features.query.history.encoder=attention",
        "features.query.history.time_buckets=16",
    ],
    "no-time": ["features.query.history.time_buckets=0"],  # attention without time gaps
    "transformer": [
        "features.query.history.encoder=transformer",
        "features.query.history.heads=2",
        "training.examples=sequences",
    ],
    "gru": ["features.query.history.encoder=gru", "training.examples=sequences"],
    # multi-interest query towers: four interests from the history (ComiRec's default K)
    "interests-sa": ["features.query.history.interests=4"],
    "interests-routing": [
        "features.query.history.interests=4",
        "features.query.history.extractor=routing",
    ],
}
# "recipe": the config's own objective and settings, as a user running it gets them
RUNS = {"recipe": [], **OBJECTIVES}
QUICK = ["data.sample_queries=200", "training.epochs=1", "training.tensorboard=false"]


def base_config(
    name: str, data_dir: Path | None, quick: bool, threads: int | None = None
) -> Config:
    path, _ = DATASETS[name]
    settings = [f"training.ks={KS}", "training.tensorboard=false"]
    settings += [f"threads={threads}"] if threads is not None else []
    config = load_config(path, settings)
    if data_dir is not None:
        config = dataclasses.replace(config, data=with_data_dir(config.data, data_dir))
    return apply_overrides(config, QUICK) if quick else config


def run_baselines(config: Config) -> dict[str, dict[str, float]]:
    dataset, split = load_data(config)
    return {
        name: evaluate_baseline(name, MemorySource(dataset, split), KS, config.baselines)
        for name in BASELINES
    }


def run_two_tower(
    config: Config, objective: str, variant: str, seed: int, out: Path, ledger: Path | None
) -> dict:
    """One training run's metrics; a finished run is read back (from its folder, or from
    the ledger), a stopped one resumed. A finished run's metrics go into the ledger."""
    settings = [] if objective == "recipe" else objective_settings(objective)
    run_config = apply_overrides(config, [*settings, *VARIANTS[variant], f"seed={seed}"])
    name = f"{objective}-{variant}-s{seed}"
    folder = out / name
    recorded = ledger / out.name / f"{name}.json" if ledger is not None else None
    recipe = recipe_digest(run_config)
    if recorded is not None and recorded.is_file():
        entry = json.loads(recorded.read_text())
        _same_recipe(recorded, "ledger entry", entry.get("recipe", recipe), recipe, name)
        return entry
    if (folder / METRICS_FILE).is_file():
        made = recipe_digest(load_config(folder / "config.yaml"))
        _same_recipe(folder, "finished run", made, recipe, name)
        metrics = json.loads((folder / METRICS_FILE).read_text())
    else:
        resume = CheckpointStore(folder / "checkpoints").exists("last")
        metrics = train_run(run_config, folder, resume=resume).metrics
    metrics = {**metrics, "recipe": recipe}
    if recorded is not None:
        recorded.parent.mkdir(parents=True, exist_ok=True)
        recorded.write_text(json.dumps(metrics, indent=2, sort_keys=True) + "\n")
    return metrics


def _same_recipe(where: Path, what: str, made: str, today: str, name: str) -> None:
    if made != today:
        raise SystemExit(
            f"{where}: this {what} was trained from another recipe than today's config "
            f"gives {name} (digest {made}, today {today}); move it aside, or pass another "
            "--out or --ledger, to train it again"
        )


def recipe_digest(config: Config) -> str:
    """A digest of everything in a run's config that can change its numbers: the settings
    that differ from their defaults (so a setting added later, whose default keeps the
    old behaviour, leaves old entries valid), not the thread count, the data folder's
    location or what is logged. An entry made on another machine or checkout still
    counts; one made from an older recipe does not."""
    raw = _settings(config)
    raw.get("data", {}).pop("path", None)
    raw.pop("threads", None)
    for key in ("tensorboard", "eval_batch_size", "device"):
        raw.get("training", {}).pop(key, None)
    text = json.dumps(raw, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _settings(value: object) -> object:
    """A config as plain data, each dataclass keeping only its non-default fields (and
    its ``kind``, which names the class)."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        kept = {}
        for field in dataclasses.fields(value):
            current = getattr(value, field.name)
            if field.default is not dataclasses.MISSING:
                default = field.default
            elif field.default_factory is not dataclasses.MISSING:
                default = field.default_factory()
            else:
                default = dataclasses.MISSING
            if field.name == "kind" or current != default:
                kept[field.name] = _settings(current)
        return kept
    if isinstance(value, (list, tuple)):
        return [_settings(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _settings(v) for k, v in value.items()}
    return to_dict(value)


def summarize(runs: list[dict[str, float]], keys: list[str]) -> dict[str, list[float]]:
    """{key: [mean, standard deviation]} over seeds (deviation 0 for one seed)."""
    return {
        key: [
            statistics.fmean(r[key] for r in runs),
            statistics.stdev(r[key] for r in runs) if len(runs) > 1 else 0.0,
        ]
        for key in keys
    }


def evaluate_dataset(name: str, args: argparse.Namespace) -> dict:
    config = base_config(name, args.data_dir, args.quick, args.threads)
    _, metrics = DATASETS[name]
    selection = config.training.metric
    keys = [f"test/{m}" for m in metrics] + [selection] + [f"test/recall@{k}" for k in KS]
    rows: dict[str, dict] = {
        baseline: {"kind": "baseline", **{k: [v[k], 0.0] for k in keys}}
        for baseline, v in run_baselines(config).items()
    }
    out = args.out / (f"{name}-quick" if args.quick else name)
    for objective in args.objectives:
        candidates = {}
        for variant in args.variants:
            runs = [
                run_two_tower(config, objective, variant, s, out, args.ledger) for s in args.seeds
            ]
            row = {"kind": "two-tower", "objective": objective, "variant": variant}
            candidates[variant] = {**row, **summarize(runs, keys)}
            rows[f"{objective} ({variant})"] = candidates[variant]
            print(name, objective, variant, json.dumps(candidates[variant]), flush=True)
        best = max(candidates, key=lambda v: candidates[v][selection][0])
        if len(candidates) > 1:
            rows[f"{objective} (best: {best})"] = {**candidates[best], "kind": "best"}
        else:
            candidates[best]["kind"] = "best"  # the only variant is the one shown
    return {"metrics": [f"test/{m}" for m in metrics], "selection": selection, "rows": rows}


def markdown(name: str, result: dict, seeds: list[int]) -> str:
    metrics, selection = result["metrics"], result["selection"]
    head = ["model", *metrics, selection]
    lines = [
        f"### {name} ({len(seeds)} seed{'s' if len(seeds) > 1 else ''} for two-tower rows)",
        "",
        "| " + " | ".join(head) + " |",
        "|---|" + "---:|" * (len(head) - 1),
    ]
    for row_name, row in result["rows"].items():
        if row["kind"] == "baseline" or len(seeds) == 1:
            cells = [f"{row[m][0]:.4f}" for m in [*metrics, selection]]
        else:
            cells = [f"{row[m][0]:.4f} ± {row[m][1]:.4f}" for m in [*metrics, selection]]
        lines.append(f"| {row_name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(name: str, result: dict, path: Path) -> None:
    """One bar chart per metric: baselines and each objective's best variant."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = {n: r for n, r in result["rows"].items() if r["kind"] in ("baseline", "best")}
    metrics = result["metrics"]
    fig, axes = plt.subplots(1, len(metrics), figsize=(4 * len(metrics), 4), squeeze=False)
    for ax, metric in zip(axes[0], metrics, strict=True):
        labels = [n.split(" (")[0] for n in shown]
        means = [r[metric][0] for r in shown.values()]
        spreads = [r[metric][1] for r in shown.values()]
        colors = ["#999999" if r["kind"] == "baseline" else "#3b75af" for r in shown.values()]
        ax.bar(labels, means, yerr=spreads, color=colors, capsize=3)
        ax.set_title(f"{name}: {metric}")
        ax.tick_params(axis="x", rotation=60)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("runs/quality"))
    parser.add_argument("--datasets", default="ml100k,ml1m")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--variants", default="mlp,dcn")
    parser.add_argument(
        "--threads", type=int, default=None, help="CPU threads per run (1 when runs share cores)."
    )
    parser.add_argument("--objectives", default=",".join(RUNS))
    parser.add_argument("--data-dir", type=Path, default=None)
    parser.add_argument(
        "--ledger",
        type=Path,
        default=None,
        help="folder of finished runs' metrics (DATASET/RUN.json): read instead of training "
        "again, and written as runs finish (kept apart from the run folders, e.g. in git)",
    )
    parser.add_argument("--quick", action="store_true", help="200 users, 1 epoch, 1 seed, mlp")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    args.seeds = [0] if args.quick else [int(s) for s in args.seeds.split(",")]
    args.variants = ["mlp"] if args.quick else args.variants.split(",")
    args.objectives = args.objectives.split(",")
    unknown = set(args.objectives) - set(RUNS) | set(args.variants) - set(VARIANTS)
    if unknown:
        parser.error(f"unknown objective or variant: {', '.join(sorted(unknown))}")
    results = {name: evaluate_dataset(name, args) for name in args.datasets.split(",")}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "quality.json").write_text(json.dumps(results, indent=2))
    text = "\n".join(markdown(name, r, args.seeds) for name, r in results.items())
    (args.out / "quality.md").write_text(text)
    for name, result in results.items():
        plot(name, result, args.out / f"quality-{name}.png")
    print(text)


if __name__ == "__main__":
    main()
