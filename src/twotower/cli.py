"""The ``twotower`` command: a thin layer over the Python API, holding no logic of its own."""

from __future__ import annotations

import contextlib
import json
import logging
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated

import typer

from twotower.errors import TwoTowerError

app = typer.Typer(
    help="Two-tower retrieval: train, evaluate honestly, export, serve.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
data_app = typer.Typer(help="Make, import and inspect datasets.", no_args_is_help=True)
app.add_typer(data_app, name="data")

Overrides = Annotated[
    list[str] | None,
    typer.Option("--set", help="Override a config value: section.key=value (repeatable)."),
]

DEMO_COLUMNS = ["test/recall@10", "test/ndcg@10", "test/hr@10", "test/mrr@10", "test/recall@50"]


@app.command()
def demo(
    out: Annotated[Path, typer.Option(help="Run folder.")] = Path("runs/demo"),
    overrides: Overrides = None,
) -> None:
    """Generate the built-in synthetic data, fit features, evaluate, print a table."""
    from twotower.demo import format_table, run_demo

    result = run_demo(out, overrides or [])
    typer.echo(f"\nFull-corpus ranking, seen items excluded (test split, run folder {out}):\n")
    typer.echo(format_table(result.metrics, DEMO_COLUMNS))
    stages = ", ".join(f"{k} {v:.1f}s" for k, v in result.seconds.items())
    typer.echo(
        f"\nTime: {stages}. Metrics: {out / 'metrics.json'}; plot: {out / 'recall_at_k.png'}"
    )


@app.command()
def train(
    config_path: Annotated[Path, typer.Argument(metavar="CONFIG", help="YAML config.")],
    out: Annotated[Path, typer.Option(help="Run folder.")],
    overrides: Overrides = None,
    resume: Annotated[
        bool, typer.Option(help="Continue the run in --out from its last checkpoint.")
    ] = False,
) -> None:
    """Train a two-tower model: checkpoints, logs, curves and metrics.json in --out."""
    from twotower.config import load_config
    from twotower.training.run import train_run

    config = load_config(config_path, overrides or [])
    out.mkdir(parents=True, exist_ok=True)
    with _log_to(out / "train.log"):
        result = train_run(config, out, resume=resume)
    best = result.metrics["best_epoch"]
    typer.echo(f"\nBest epoch {best}; full-corpus ranking, seen items excluded:\n")
    typer.echo(format_metrics(result.metrics, config.training.ks))
    typer.echo(f"\nRun folder: {out} (metrics.json, metrics.jsonl, curves.png, checkpoints/)")


@contextlib.contextmanager
def _log_to(path: Path) -> Iterator[None]:
    """Copies the package's INFO log lines into ``path`` while the block runs."""
    logger = logging.getLogger("twotower")
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    level = logger.level
    logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
        handler.close()


def format_metrics(metrics: dict[str, float], ks: list[int]) -> str:
    """A table with one row per split and a column per metric@k."""
    names = ("recall", "hr", "ndcg", "mrr")
    columns = [f"{name}@{k}" for k in ks for name in names]
    lines = ["split  " + "  ".join(f"{c:>10}" for c in columns)]
    for part in ("valid", "test"):
        values = [metrics.get(f"{part}/{c}", float("nan")) for c in columns]
        lines.append(f"{part:<5}  " + "  ".join(f"{v:>10.4f}" for v in values))
    return "\n".join(lines)


@data_app.command("synth")
def data_synth(
    out: Annotated[Path, typer.Option(help="Folder for the Parquet files.")],
    queries: Annotated[int, typer.Option(help="Number of users.")] = 2000,
    items: Annotated[int, typer.Option(help="Number of items.")] = 1000,
    clusters: Annotated[int, typer.Option(help="Number of latent clusters.")] = 8,
    per_query: Annotated[int, typer.Option(help="Mean interactions per user.")] = 20,
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
) -> None:
    """Write a synthetic dataset with planted clusters as three Parquet files."""
    from twotower.data.synthetic import SyntheticConfig, generate, write_parquet

    config = SyntheticConfig(
        num_queries=queries,
        num_items=items,
        num_clusters=clusters,
        interactions_per_query=per_query,
        seed=seed,
    )
    paths = write_parquet(generate(config).dataset, out)
    for role, path in paths.items():
        typer.echo(f"{role}: {path}")


@data_app.command("prepare")
def data_prepare(
    config_path: Annotated[Path, typer.Argument(metavar="CONFIG", help="YAML config.")],
    out: Annotated[Path, typer.Option(help="Folder for the fitted feature state.")],
    overrides: Overrides = None,
) -> None:
    """Load and check a dataset, split it, fit the features on train, and save them."""
    from twotower.config import load_config, save_config
    from twotower.data.load import load_dataset
    from twotower.data.splits import split_interactions
    from twotower.features.pipeline import FeaturePipeline

    config = load_config(config_path, overrides or [])
    clock = time.perf_counter()
    dataset = load_dataset(
        config.data,
        config.features.required_columns("query"),
        config.features.required_columns("item"),
    )
    loaded = time.perf_counter()
    split = split_interactions(dataset, config.split)
    split_done = time.perf_counter()
    pipeline = FeaturePipeline.fit(config.features, dataset, split.train)
    fitted = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    pipeline.save(out)
    save_config(config, out / "config.yaml")
    summary = {
        "dataset": dataset.name,
        "interactions": dataset.interactions.num_rows,
        "queries": dataset.num_queries,
        "items": dataset.num_items,
        "train": split.train.num_rows,
        "valid": split.valid.num_rows,
        "test": split.test.num_rows,
        "feature_sizes": {side: pipeline.sizes(side) for side in ("query", "item")},
        "seconds": {
            "load": round(loaded - clock, 3),
            "split": round(split_done - loaded, 3),
            "fit_features": round(fitted - split_done, 3),
        },
    }
    typer.echo(json.dumps(summary, indent=2))


def main() -> None:
    """Entry point: user errors print one clear line and exit with status 2."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        app()
    except TwoTowerError as err:
        typer.echo(f"error: {err}", err=True)
        sys.exit(2)
