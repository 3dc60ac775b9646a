"""The ``twotower`` command: a thin layer over the Python API, holding no logic of its own."""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import importlib
import json
import logging
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Annotated

import typer

from twotower.errors import ConfigError, DataError, TwoTowerError
from twotower.serving.settings import EXACT_FILTER_LIMIT  # imports nothing heavy

if TYPE_CHECKING:  # the command line imports the pipeline lazily, command by command
    from twotower.config import Config
    from twotower.tuning.study import Report

app = typer.Typer(
    help="Two-tower retrieval: train, evaluate honestly, export, serve.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
data_app = typer.Typer(help="Make, import and inspect datasets.", no_args_is_help=True)
app.add_typer(data_app, name="data")
state_app = typer.Typer(help="Users' state for serving, in an online store.", no_args_is_help=True)
app.add_typer(state_app, name="state")

Overrides = Annotated[
    list[str] | None,
    typer.Option("--set", help="Override a config value: section.key=value (repeatable)."),
]

Threads = Annotated[
    int | None,
    typer.Option(
        help="CPU threads torch computes with (default: the config's threads, else "
        "MKL_NUM_THREADS or OMP_NUM_THREADS where set, else the CPUs this process may use); "
        "1 where other processes share the cores."
    ),
]

DataDir = Annotated[
    Path | None,
    typer.Option(help="Folder holding the MovieLens folders (ml-100k/, ml-1m/, ...)."),
]

DEMO_COLUMNS = ["test/recall@10", "test/ndcg@10", "test/hr@10", "test/mrr@10", "test/recall@50"]


@app.command()
def demo(
    out: Annotated[Path, typer.Option(help="Run folder.")] = Path("runs/demo"),
    overrides: Overrides = None,
    threads: Threads = None,
) -> None:
    """Generate the built-in synthetic data, fit features, evaluate, print a table."""
    from twotower.demo import format_new_items, format_table, run_demo

    given = [f"threads={threads}"] if threads is not None else []
    result = run_demo(out, [*(overrides or []), *given])
    typer.echo(f"\nFull-corpus ranking, seen items excluded (test split, run folder {out}):\n")
    typer.echo(format_table(result.metrics, DEMO_COLUMNS))
    typer.echo(f"\n{format_new_items(result)}")
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
    data_dir: DataDir = None,
    threads: Threads = None,
    init_from: Annotated[
        Path | None,
        typer.Option(
            metavar="RUN",
            help="Start from this earlier run's model (a warm start): its features grown "
            "with the new training examples (split.train_from picks a new period), its "
            "weights and optimizer state carried over.",
        ),
    ] = None,
) -> None:
    """Train a two-tower model: checkpoints, logs, curves and metrics.json in --out.

    Under ``torchrun --nproc_per_node=N -m twotower train ...`` the N processes train
    one model with DistributedDataParallel; rank 0 alone writes and prints.
    """
    from twotower.training.distributed import close_process_group
    from twotower.training.run import train_run

    config = _config(config_path, overrides, data_dir, threads)
    if int(os.environ.get("RANK", "0")) > 0:  # another rank of a torchrun job: quiet
        logging.getLogger().setLevel(logging.WARNING)
        try:
            train_run(config, out, resume=resume, init_from=init_from)
        finally:
            close_process_group()
        return
    out.mkdir(parents=True, exist_ok=True)
    with _log_to(out / "train.log"):
        try:
            result = train_run(config, out, resume=resume, init_from=init_from)
        finally:
            close_process_group()
    best = result.metrics["best_epoch"]
    typer.echo(f"\nBest epoch {best}; full-corpus ranking, seen items excluded:\n")
    _print_metrics(result.metrics, list(config.training.ks), ("valid", "test"))
    typer.echo(f"\nRun folder: {out} (metrics.json, metrics.jsonl, curves.png, checkpoints/)")


PerUser = Annotated[
    Path | None,
    typer.Option(
        "--per-user",
        metavar="FILE",
        help="Write each evaluated user's metrics to FILE (Parquet if it ends in .parquet, "
        "else CSV): part, query id, training count, activity group, every metric@k.",
    ),
]

Plot = Annotated[
    Path | None,
    typer.Option(
        metavar="FILE",
        help="Save a PNG of --plot-metric by item popularity and user activity group "
        "(test if ranked, else valid).",
    ),
]

Compare = Annotated[
    list[Path] | None,
    typer.Option(
        metavar="RUN_DIR",
        help="Another run or baseline folder whose metrics.json joins the plot (repeatable).",
    ),
]


@app.command("evaluate")
def evaluate_command(
    run_dir: Annotated[Path, typer.Argument(metavar="RUN_DIR", help="A training run folder.")],
    split: Annotated[
        str, typer.Option(help="Which held-out part to rank: valid, test or both.")
    ] = "both",
    k: Annotated[str | None, typer.Option(help="Cutoffs, e.g. 10,50,100.")] = None,
    keep_seen: Annotated[
        bool, typer.Option(help="Keep items the user already saw in the ranking.")
    ] = False,
    checkpoint: Annotated[str, typer.Option(help="best or last.")] = "best",
    threads: Threads = None,
    sample: Annotated[
        int | None,
        typer.Option(
            help="A run on a data build: rank about this many queries of each part, a "
            "seeded sample (default: every query)."
        ),
    ] = None,
    per_user: PerUser = None,
    plot: Plot = None,
    plot_metric: Annotated[
        str | None, typer.Option(help="The metric of --plot (default: ndcg at the first k).")
    ] = None,
    compare: Compare = None,
) -> None:
    """Rank the whole corpus with a trained run's model; print and save the metrics."""
    from twotower.evaluation.per_query import QueryMetrics, write_query_metrics
    from twotower.training.run import evaluate_run, save_evaluation

    parts, ks = _parts(split), _ks(k)
    name = run_dir.resolve().name
    compared = _compared(name, compare or [])  # read first: a wrong folder fails early
    per_query = QueryMetrics() if per_user else None
    metrics = evaluate_run(
        run_dir,
        parts,
        ks,
        not keep_seen,
        checkpoint=checkpoint,
        threads=threads,
        sample=sample,
        per_query=per_query,
    )
    path = save_evaluation(run_dir, metrics, parts, exclude_seen=not keep_seen)
    ks = ks or _run_ks(metrics)
    _print_metrics(metrics, ks, parts)
    typer.echo(f"\nSaved: {path}")
    if per_user is not None and per_query is not None:
        write_query_metrics(per_query.table(), per_user)
        typer.echo(f"Per user: {per_user}")
    if plot is not None:
        runs = {name: metrics, **compared}
        _plot_groups(runs, parts[-1], plot_metric or f"ndcg@{min(ks)}", plot)
        typer.echo(f"Plot: {plot}")


def _compared(own: str, folders: list[Path]) -> dict[str, dict[str, float]]:
    """Each folder's ``metrics.json`` (a run's or a baseline's), by the folder's name
    (its path where the run's own, ``own``, or another has that name)."""
    runs: dict[str, dict[str, float]] = {}
    for folder in folders:
        path = folder / "metrics.json"
        if not path.is_file():
            raise ConfigError(f"--compare {folder}: no metrics.json there")
        name = folder.name if folder.name not in (*runs, own) else str(folder)
        runs[name] = json.loads(path.read_text(encoding="utf-8"))
    return runs


def _plot_groups(runs: dict[str, dict[str, float]], part: str, metric: str, path: Path) -> None:
    """``plot_groups``, refusing a metric the groups do not hold."""
    from twotower.evaluation.report import plot_groups

    first = next(iter(runs.values()))
    if not any(key.startswith(f"{part}/groups/") and key.endswith(f"/{metric}") for key in first):
        raise ConfigError(f"--plot-metric {metric!r}: no {part} metric by group of that name")
    plot_groups(runs, part, metric, path)


def _print_metrics(metrics: dict[str, float], ks: list[int], parts: tuple[str, ...]) -> None:
    """The metrics table, then the table by group where the metrics hold groups."""
    from twotower.evaluation.report import format_groups

    typer.echo(format_metrics(metrics, ks, parts))
    groups = format_groups(metrics, ks, parts)
    if groups:
        typer.echo(f"\nBy group (training counts; docs/evaluation.md):\n\n{groups}")


@app.command()
def baseline(
    config_path: Annotated[Path, typer.Argument(metavar="CONFIG", help="YAML config.")],
    model: Annotated[str, typer.Option(help="pop, itemknn or ease.")],
    out: Annotated[Path, typer.Option(help="Run folder.")],
    overrides: Overrides = None,
    data_dir: DataDir = None,
) -> None:
    """Fit a reference baseline and rank the full corpus beside the model's protocol."""
    from twotower.baselines.run import baseline_run

    config = _config(config_path, overrides, data_dir)
    metrics = baseline_run(model, config, out)
    typer.echo(f"{model}: full-corpus ranking, seen items excluded\n")
    _print_metrics(metrics, list(config.training.ks), ("valid", "test"))
    typer.echo(f"\nRun folder: {out}")


@app.command()
def tune(
    config_path: Annotated[Path, typer.Argument(metavar="CONFIG", help="YAML config.")],
    space: Annotated[
        Path, typer.Option(help="YAML search space: config keys -> ranges (docs/tuning.md).")
    ],
    trials: Annotated[
        int,
        typer.Option(
            help="Trials to finish (complete, pruned, or failed on values that do not go "
            "together); a resumed tuning counts the ones already finished."
        ),
    ],
    out: Annotated[Path, typer.Option(help="Tuning folder: study.db, trials/, best.yaml, ...")],
    timeout: Annotated[
        float | None, typer.Option(help="Start no new trial after this many seconds.")
    ] = None,
    jobs: Annotated[
        int, typer.Option(help="Trials at once, as threads sharing the CPU threads.")
    ] = 1,
    resume: Annotated[
        bool, typer.Option(help="Continue the tuning in --out; cut-short trials run again.")
    ] = False,
    prune_after: Annotated[
        int | None,
        typer.Option(
            help="The earliest epoch at which a trial can be pruned (below the median of "
            "earlier trials at that epoch); past training.epochs: no pruning. Default 2."
        ),
    ] = None,
    startup_trials: Annotated[
        int | None,
        typer.Option(help="No trial is pruned before this many have completed. Default 5."),
    ] = None,
    overrides: Overrides = None,
    data_dir: DataDir = None,
    threads: Threads = None,
) -> None:
    """Search hyperparameters with Optuna (TPE, median pruning), each trial a training run.

    Trials maximize the best validation value of training.metric; only the best trial
    is ranked on test. The study lives in --out/study.db, so --resume continues it.
    """
    space_module, study = _tuning_modules()
    pruning = _given(startup_trials=startup_trials, warmup_epochs=prune_after)
    options = study.TuneOptions(trials=trials, timeout=timeout, jobs=jobs, resume=resume, **pruning)
    config = _config(config_path, overrides, data_dir, threads)
    report = study.tune(config, space_module.load_space(space, config), out, options)
    _print_tuning(report, config, out)


def _tuning_modules() -> tuple[ModuleType, ModuleType]:
    """``twotower.tuning``'s space and study modules, or an error that says how to
    install Optuna, which they need."""
    try:  # by their full names, so a missing Optuna is found even where they were loaded
        space = importlib.import_module("twotower.tuning.space")
        study = importlib.import_module("twotower.tuning.study")
    except ModuleNotFoundError as err:
        if err.name != "optuna":
            raise
        raise ConfigError(
            "twotower tune needs Optuna: pip install 'twotower[tune]' (or pip install optuna)"
        ) from None
    return space, study


def _given(**options: object) -> dict[str, object]:
    """The options given on the command line (not None), so the defaults stay the
    library's."""
    return {key: value for key, value in options.items() if value is not None}


def _print_tuning(report: Report, config: Config, out: Path) -> None:
    """The tuning's trials by state, its best trial and that trial's test metrics."""
    states = collections.Counter(t.state.name.lower() for t in report.study.trials)
    counted = ", ".join(f"{n} {state}" for state, n in states.items())
    typer.echo(f"\nTrials: {counted}; the table: {out / 'trials.csv'}")
    if report.best is None:
        typer.echo("No trial completed, so there is no best config.")
        return
    best, metric = report.best, config.training.metric
    typer.echo(f"Best: trial {best.number}, {metric} {best.value:.4f}, {json.dumps(best.params)}")
    typer.echo("Its test metrics (the tuning's one look at test):\n")
    typer.echo(format_metrics(report.test_metrics, config.training.ks, ("test",)))
    typer.echo(f"\nBest config: {out / 'best.yaml'} (twotower train {out / 'best.yaml'} --out ...)")


UpdateOption = Annotated[
    Path | None,
    typer.Option(
        metavar="ARTIFACT",
        help="Instead of exporting a run: write the next version of this artifact from "
        "--items, --block, --unblock and --remove, in place.",
    ),
]
ItemsOption = Annotated[
    Path | None,
    typer.Option(
        help="With --update: a CSV or Parquet file of item rows to add or replace (the item "
        "key and every column the item features read)."
    ),
]


def _ids_option(verb: str) -> typer.models.OptionInfo:
    return typer.Option(help=f"With --update: a file of item ids to {verb}.")


@app.command()
def export(
    run_dir: Annotated[
        Path | None, typer.Argument(metavar="RUN_DIR", help="A training run folder.")
    ] = None,
    out: Annotated[Path | None, typer.Option(help="Artifact folder (replaced atomically).")] = None,
    index: Annotated[
        str, typer.Option(help="exact, flat, hnsw, ivfpq, or auto (by corpus size).")
    ] = "exact",
    threads: Threads = None,
    as_of: Annotated[
        str,
        typer.Option(
            help="Users' histories and seen items as of: valid (the state test is measured "
            "in), test, or all (every logged interaction)."
        ),
    ] = "all",
    query_vectors: Annotated[
        Path | None,
        typer.Option(
            help="Also write every known query's vector to this Parquet file, for "
            "twotower serve --query-vectors (outside the artifact folder)."
        ),
    ] = None,
    onnx: Annotated[
        bool,
        typer.Option(
            help="Also write the query tower as ONNX (onnx/query_tower.onnx, checked "
            "against PyTorch on 1,000 known queries), for twotower serve --runtime onnx "
            "or any ONNX runtime."
        ),
    ] = False,
    update: UpdateOption = None,
    items: ItemsOption = None,
    block: Annotated[Path | None, _ids_option("block")] = None,
    unblock: Annotated[Path | None, _ids_option("unblock")] = None,
    remove: Annotated[Path | None, _ids_option("remove")] = None,
) -> None:
    """Write a self-contained, checksummed serving artifact from a run's best model; or,
    with --update, the next version of an artifact with items added, replaced, blocked,
    unblocked or removed (id files: one id per line, or a Parquet column)."""
    changes = {"items": items, "block": block, "unblock": unblock, "remove": remove}
    if update is not None:
        if run_dir is not None or out is not None:
            raise ConfigError("--update changes an artifact in place: give no RUN_DIR nor --out")
        _export_update(update, threads, **changes)
        return
    given = [f"--{name}" for name, value in changes.items() if value is not None]
    if given:
        raise ConfigError(f"{', '.join(given)}: only with --update ARTIFACT")
    if run_dir is None or out is None:
        raise ConfigError("give a RUN_DIR and --out (or --update ARTIFACT)")
    from twotower.export import export_run

    manifest = export_run(run_dir, out, index, threads, as_of, onnx, query_vectors)
    _print_export(manifest, out, onnx, query_vectors)


def _print_export(manifest: dict, out: Path, onnx: bool, query_vectors: Path | None) -> None:
    """What ``twotower export`` wrote."""
    typer.echo(
        f"Exported {manifest['num_items']} item vectors of dimension {manifest['embedding_dim']} "
        f"and {manifest['num_queries']} known queries, index {manifest['index']!r}, to {out}"
    )
    check = manifest["index_recall"]
    typer.echo(
        f"Index recall@{check['k']} against exact search: {check['recall']:.4f} "
        f"({check['queries']} known queries, seen items excluded)"
    )
    if onnx:
        check = manifest["onnx"]["check"]
        typer.echo(
            f"ONNX query tower: {manifest['onnx']['file']}, largest difference from PyTorch "
            f"{check['max_abs_diff']:.2g} over {check['queries']} known queries"
        )
    if query_vectors is not None:
        typer.echo(f"Wrote {manifest['num_queries']} query vectors to {query_vectors}")


def _export_update(artifact: Path, threads: int | None, **changes: Path | None) -> None:
    """``twotower export --update``: the next version, and what it changed."""
    from twotower.export import update_artifact

    done = update_artifact(artifact, threads=threads, **changes)
    counts = ", ".join(
        f"{done[name]} {name}" for name in ("added", "replaced", "blocked", "unblocked", "removed")
    )
    unchanged = f" ({done['unchanged']} rows unchanged, not written)" if done["unchanged"] else ""
    if done["written"]:
        typer.echo(f"Wrote version {done['version']} of {artifact}: {counts}{unchanged}")
    else:
        typer.echo(f"Nothing changed: {artifact} stays at version {done['version']}{unchanged}")


@app.command()
def recall(
    artifact: Annotated[Path, typer.Argument(metavar="ARTIFACT_DIR", help="An exported artifact.")],
    user: Annotated[str | None, typer.Option(help="A known user id.")] = None,
    users_file: Annotated[
        Path | None, typer.Option(help="A file with one known user id per line.")
    ] = None,
    query: Annotated[str | None, typer.Option(help="Query text (a text query feature).")] = None,
    k: Annotated[int, typer.Option("-k", "--k", help="How many items to return.")] = 10,
    keep_seen: Annotated[
        bool, typer.Option(help="Allow items the user already interacted with.")
    ] = False,
    threads: Threads = None,
) -> None:
    """Print the top K items as JSON lines: {"query": ..., "items": [...], "scores": [...]},
    and "interests": [...] (which interest found each item) from a multi-interest model."""
    from twotower.serving import Retriever
    from twotower.threads import set_threads

    given = [
        name
        for name, value in (("--user", user), ("--users-file", users_file), ("--query", query))
        if value is not None
    ]
    if len(given) != 1:
        raise ConfigError("give exactly one of --user, --users-file or --query")
    set_threads(threads)
    retriever = Retriever.load(artifact)
    if query is not None:
        results = retriever.recall_text([query], k)
    else:
        ids = [user] if user is not None else _read_ids(users_file)
        results = retriever.recall_users(ids, k, exclude_seen=not keep_seen)
    for result in results:
        line = dataclasses.asdict(result)
        if line["interests"] is None:  # a single-vector model's lines stay as they were
            del line["interests"]
        typer.echo(json.dumps(line, default=str))


ServeRuntime = Annotated[
    str,
    typer.Option(
        help="What runs the query tower: torch, or onnx (the graph of an artifact "
        "exported with --onnx, on ONNX Runtime)."
    ),
]
ServeQueryVectors = Annotated[
    Path | None,
    typer.Option(
        help="Answer the known users this file holds from their precomputed vectors "
        "(twotower export --query-vectors), without a tower pass."
    ),
]
ServeState = Annotated[
    str | None,
    typer.Option(
        help="Keep users' states (features, recent and seen items) in Redis, shared by "
        "every replica: redis://HOST:PORT/DB (fill it with twotower state load). "
        "Default: in the service's memory, from the artifact."
    ),
]
ServeIngestToken = Annotated[
    Path | None,
    typer.Option(
        help="File holding the token POST /events takes besides the admin token "
        "(else $TWOTOWER_INGEST_TOKEN)."
    ),
]
ServeExactFilterLimit = Annotated[
    int,
    typer.Option(
        help="On an HNSW or IVF-PQ index, a query whose filter keeps at most this many "
        "items is searched exactly over them (0: never)."
    ),
]
ServeWorkers = Annotated[
    int,
    typer.Option(
        help="Worker processes sharing the socket and one mapped copy of the item "
        "vectors, index and tower weights; reloads switch all of them or none."
    ),
]


@app.command()
def serve(
    artifact: Annotated[Path, typer.Argument(metavar="ARTIFACT_DIR", help="An exported artifact.")],
    host: Annotated[str, typer.Option(help="Address to bind; 0.0.0.0 for every interface.")] = (
        "127.0.0.1"
    ),
    port: Annotated[int, typer.Option(help="TCP port; 0 picks a free one.")] = 8000,
    admin_token_file: Annotated[
        Path | None,
        typer.Option(help="File holding the token /admin/* needs (else $TWOTOWER_ADMIN_TOKEN)."),
    ] = None,
    batch_queries: Annotated[int, typer.Option(help="Most queries in one micro-batch.")] = 256,
    batch_wait_ms: Annotated[
        float, typer.Option(help="How long a micro-batch waits for more requests.")
    ] = 0.0,
    max_body_bytes: Annotated[int, typer.Option(help="Largest request body accepted.")] = 1 << 20,
    threads: Threads = None,
    query_vectors: ServeQueryVectors = None,
    runtime: ServeRuntime = "torch",
    workers: ServeWorkers = 1,
    state: ServeState = None,
    ingest_token_file: ServeIngestToken = None,
    exact_filter_limit: ServeExactFilterLimit = EXACT_FILTER_LIMIT,
) -> None:
    """Serve top-K recall over HTTP: POST /recall, /recall/batch, GET /items/{id}/similar;
    POST /events appends interactions to users' states.

    SIGHUP (or POST /admin/reload) loads the artifact folder again without dropping
    requests. The OpenAPI schema is at /openapi.json, its pages at /docs.
    """
    from twotower.serving.server import ADMIN_TOKEN_VARIABLE, INGEST_TOKEN_VARIABLE, read_token
    from twotower.serving.server import serve as run_server
    from twotower.serving.settings import ServiceConfig

    config = ServiceConfig(  # refuses a bad value (ConfigError: one line, status 2)
        max_body_bytes=max_body_bytes,
        batch_queries=batch_queries,
        batch_wait_ms=batch_wait_ms,
        admin_token=read_token(admin_token_file, ADMIN_TOKEN_VARIABLE, "admin token"),
        ingest_token=read_token(ingest_token_file, INGEST_TOKEN_VARIABLE, "ingest token"),
        reload_on_sighup=True,
        threads=threads,
        query_vectors=query_vectors,
        runtime=runtime,
        state=state,
        exact_filter_limit=exact_filter_limit,
    )

    def ready(url: str) -> None:
        typer.echo(f"Serving {artifact} on {url} (API docs: {url}/docs); Ctrl-C stops.")

    run_server(artifact, host, port, config, on_ready=ready, workers=workers)


def _read_ids(path: Path) -> list[str]:
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise DataError(f"{path}: cannot read user ids ({err})") from None
    ids = [line.strip() for line in lines if line.strip()]
    if not ids:
        raise DataError(f"{path}: no user ids (one per line)")
    return ids


def _config(
    path: Path, overrides: list[str] | None, data_dir: Path | None, threads: int | None = None
):
    """The config at ``path`` with ``--set`` overrides and, if given, ``--data-dir`` and
    ``--threads``."""
    from twotower.config import load_config
    from twotower.data.load import with_data_dir

    given = [f"threads={threads}"] if threads is not None else []
    config = load_config(path, [*(overrides or []), *given])
    if data_dir is None:
        return config
    return dataclasses.replace(config, data=with_data_dir(config.data, data_dir))


def _parts(split: str) -> tuple[str, ...]:
    if split not in ("valid", "test", "both"):
        raise ConfigError(f"--split {split!r}: choose valid, test or both")
    return ("valid", "test") if split == "both" else (split,)


def _ks(text: str | None) -> list[int] | None:
    if text is None:
        return None
    try:
        ks = [int(part) for part in text.split(",")]
    except ValueError:
        raise ConfigError(f"--k {text!r}: expected whole numbers separated by commas") from None
    if not ks or min(ks) < 1:
        raise ConfigError(f"--k {text!r}: every cutoff must be >= 1")
    return ks


def _run_ks(metrics: dict[str, float]) -> list[int]:
    return sorted({int(key.split("@")[1]) for key in metrics if "/recall@" in key})


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


def format_metrics(
    metrics: dict[str, float], ks: list[int], parts: tuple[str, ...] = ("valid", "test")
) -> str:
    """A table with one row per split and a column per metric@k."""
    names = ("recall", "hr", "ndcg", "mrr")
    columns = [f"{name}@{k}" for k in ks for name in names]
    lines = ["split  " + "  ".join(f"{c:>10}" for c in columns)]
    for part in parts:
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
    interactions: Annotated[
        int | None,
        typer.Option(
            help="Write a stream of about this many interactions instead (train/ folder of "
            "Parquet parts, valid, test, items; users follow from --per-query)."
        ),
    ] = None,
    raw: Annotated[
        bool,
        typer.Option(
            help="With --interactions: raw logs for twotower data build instead "
            "(interactions/ parts, users.parquet, items.parquet; nothing split)."
        ),
    ] = False,
) -> None:
    """Write a synthetic dataset with planted clusters as Parquet files.

    Without --interactions: three tables (interactions, users, items) for a ``files``
    source. With it: the layout ``data.source: stream`` reads, generated in blocks in
    bounded memory (``twotower.data.synthetic_stream``), e.g. --interactions 20000000
    --items 1000000.
    """
    from twotower.data.config import SyntheticConfig
    from twotower.data.synthetic import generate, write_parquet
    from twotower.data.synthetic_stream import StreamSynthConfig, write_synthetic_stream

    if raw and interactions is None:
        raise ConfigError("--raw writes raw logs of --interactions rows: give --interactions")
    planted = {"num_items": items, "num_clusters": clusters, "seed": seed}
    try:
        if interactions is not None:
            stream = StreamSynthConfig(interactions=interactions, per_user=per_query, **planted)
        else:
            config = SyntheticConfig(
                num_queries=queries, interactions_per_query=per_query, **planted
            )
    except ValueError as err:
        raise ConfigError(str(err)) from None
    if interactions is not None:
        paths = write_synthetic_stream(stream, out, raw)
    else:
        paths = write_parquet(generate(config).dataset, out)
    for role, path in paths.items():
        typer.echo(f"{role}: {path}")


@data_app.command("build")
def data_build(
    config_path: Annotated[Path, typer.Argument(metavar="CONFIG", help="YAML config.")],
    out: Annotated[Path, typer.Option(help="Folder for the built parts and manifest.")],
    memory_limit: Annotated[
        str | None,
        typer.Option(help="DuckDB's memory limit, e.g. 4GB; beyond it, it spills to --out."),
    ] = None,
    threads: Annotated[int | None, typer.Option(help="The engine's threads.")] = None,
    engine: Annotated[
        str, typer.Option(help="duckdb (one machine) or spark (a Spark cluster, --master).")
    ] = "duckdb",
    master: Annotated[
        str | None, typer.Option(help="The Spark master, with --engine spark (local[2]).")
    ] = None,
    rows_per_part: Annotated[int, typer.Option(help="Training rows per Parquet file.")] = 5_000_000,
    row_group_rows: Annotated[
        int, typer.Option(help="Rows per Parquet row group (divides --rows-per-part).")
    ] = 100_000,
    overrides: Overrides = None,
) -> None:
    """Split the interactions out of core on DuckDB (or Spark): train/ parts, valid.parquet,
    test.parquet, items.parquet, each query's row as of validation and of test, the
    features fitted once, and a manifest (rows, sha256); equal to the in-memory split,
    with the query features' columns joined into every row and each row's history.

    The folder appears whole or not at all; a killed build leaves nothing that reads as
    finished.
    """
    from twotower.data.build.engine import engine_named
    from twotower.data.build.job import BuildOptions
    from twotower.prepare import build_data

    config = _config(config_path, overrides, None)
    try:
        options = BuildOptions(threads, rows_per_part, row_group_rows)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    chosen = engine_named(engine, memory_limit=memory_limit, master=master)
    manifest = build_data(config, out, options, chosen)
    typer.echo(json.dumps({"rows": manifest["rows"], "seconds": manifest["seconds"]}, indent=2))


@data_app.command("prepare")
def data_prepare(
    config_path: Annotated[Path, typer.Argument(metavar="CONFIG", help="YAML config.")],
    out: Annotated[Path, typer.Option(help="Folder for the fitted feature state.")],
    overrides: Overrides = None,
    data_dir: DataDir = None,
) -> None:
    """Load and check a dataset, split it, fit the features on train, and save them."""
    from twotower.prepare import prepare_data

    config = _config(config_path, overrides, data_dir)
    typer.echo(json.dumps(prepare_data(config, out), indent=2))


# Seconds a bulk load waits for Redis (a request waits the store's default, far less).
STATE_LOAD_TIMEOUT = 30.0


@state_app.command("load")
def state_load(
    artifact: Annotated[Path, typer.Argument(metavar="ARTIFACT", help="An exported artifact.")],
    url: Annotated[
        str,
        typer.Option(
            "--redis",
            help="The Redis server: redis://HOST:PORT/DB (rediss:// with TLS, unix:///PATH).",
        ),
    ],
    prefix: Annotated[str, typer.Option(help="The start of every key written.")] = "twotower",
) -> None:
    """Load an artifact's users (features, recent items, seen items) into Redis, tagged
    with its fingerprint: users already loaded from it are skipped, events kept."""
    from twotower.serving.artifact import Artifact
    from twotower.serving.stores.redis_store import RedisStore

    loaded = Artifact.load(artifact)
    store = RedisStore(url, prefix, timeout=STATE_LOAD_TIMEOUT)
    try:
        counts = store.load_artifact(loaded)
    finally:
        store.close()
    typer.echo(
        f"Loaded {counts.loaded} users of {artifact} (fingerprint {loaded.fingerprint}) into "
        f"{store.name} under {prefix!r}; {counts.skipped} held this artifact already"
    )


def main() -> None:
    """Entry point: an error prints one line and a non-zero status; ``--debug`` shows more.

    A user error (bad config, bad data, a missing run) exits with status 2, anything
    unexpected with 1. ``--debug`` anywhere on the line re-raises with the traceback.
    """
    debug = "--debug" in sys.argv
    if debug:
        sys.argv.remove("--debug")
    logging.basicConfig(
        level=logging.DEBUG if debug else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s",
    )
    logging.getLogger("faiss").setLevel(logging.WARNING)  # which CPU build it loaded
    try:
        app()
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        sys.exit(130)
    except Exception as err:
        if debug:
            raise
        user_error = isinstance(err, TwoTowerError)
        kind = "error" if user_error else f"error ({type(err).__name__})"
        hint = "" if user_error else " (run again with --debug for the traceback)"
        typer.echo(f"{kind}: {err}{hint}", err=True)
        sys.exit(2 if user_error else 1)
