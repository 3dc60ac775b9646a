"""The data a config names: loaded, checked and split; and ``prepare_data``, which also
fits the features and saves them (``twotower data prepare``).

Every command that needs a run's data in memory (training, evaluation, baselines,
export, the demo) loads it here, so they all read the same columns and split alike.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from twotower.config import Config, save_config
from twotower.data.build.engine import Engine, build_split
from twotower.data.build.format import FEATURES_DIR, output_columns, stream_files
from twotower.data.build.job import BuildOptions, Histories
from twotower.data.config import StreamConfig
from twotower.data.dataset import Dataset
from twotower.data.load import load_dataset
from twotower.data.splits import Split, split_interactions
from twotower.errors import ConfigError
from twotower.features.pipeline import FeaturePipeline
from twotower.features.specs import HistoryFeature
from twotower.features.streaming import fit_built_pipeline, save_fitted
from twotower.storage import sha256_file


def load_data(config: Config) -> tuple[Dataset, Split]:
    """The dataset the config names (``read_dataset``) and its train / valid / test split."""
    dataset = read_dataset(config)
    return dataset, split_interactions(dataset, config.split)


def read_dataset(config: Config) -> Dataset:
    """The dataset the config names, read with the columns its features need.

    Raises:
        ConfigError: the source is a stream, which only training reads.
        DataError: a table is missing, malformed or inconsistent (named).
    """
    if config.data.source == "stream":
        raise ConfigError(
            "data.source 'stream' is read by training only, in bounded memory; this command "
            "needs the data in memory (a 'files' source over the same Parquet files)"
        )
    return load_dataset(
        config.data,
        config.features.required_columns("query"),
        config.features.required_columns("item"),
    )


def prepare_data(config: Config, out: Path) -> dict[str, Any]:
    """Loads and splits the data, fits the features on train, and saves them in ``out``
    with the resolved config.

    Returns:
        A summary: the dataset's sizes, each part's interactions, every feature's size
        and the seconds each stage took.
    """
    clock = time.perf_counter()
    dataset = read_dataset(config)
    loaded = time.perf_counter()
    split = split_interactions(dataset, config.split)
    split_done = time.perf_counter()
    pipeline = FeaturePipeline.fit(config.features, dataset, split.train)
    fitted = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    pipeline.save(out)
    save_config(config, out / "config.yaml")
    return {
        "dataset": dataset.name,
        "interactions": dataset.interactions.num_rows,
        "queries": dataset.num_queries,
        "items": dataset.num_items,
        **{part: getattr(split, part).num_rows for part in ("train", "valid", "test")},
        "feature_sizes": {side: pipeline.sizes(side) for side in ("query", "item")},
        "seconds": {
            "load": round(loaded - clock, 3),
            "split": round(split_done - loaded, 3),
            "fit_features": round(fitted - split_done, 3),
        },
    }


def build_data(
    config: Config,
    out: Path,
    options: BuildOptions | None = None,
    engine: Engine | str = "duckdb",
) -> dict[str, Any]:
    """``twotower data build``: the config's split, histories and feature columns built
    out of core into ``out`` on ``engine`` (``twotower.data.build``), and its features
    fitted there once (``features/``: the state, ``item_counts.npy``, ``fit.json``), as
    in memory.

    Returns:
        The build's manifest.
    """
    lengths = {
        spec.name: spec.max_len
        for spec in config.features.query
        if isinstance(spec, HistoryFeature)
    }
    columns = {  # a history reads the interactions, not a table column
        side: [
            spec.column
            for spec in getattr(config.features, side)
            if not isinstance(spec, HistoryFeature)
        ]
        for side in ("query", "item")
    }
    data = config.data

    def fit(staging: Path) -> dict[str, dict[str, Any]]:
        assert data.interactions is not None  # build_split checked the source
        key = data.queries.key if data.queries is not None else data.interactions.query_id
        stream = StreamConfig(**stream_files(staging, output_columns(data, columns).roles))
        queries = staging / "queries_valid.parquet"
        fitted = fit_built_pipeline(stream, queries, config.features, key, config.seed)
        return {
            path.relative_to(staging).as_posix(): {"rows": None, "sha256": sha256_file(path)}
            for path in save_fitted(staging / FEATURES_DIR, *fitted)
        }

    histories = Histories(lengths, config.training.history)
    return build_split(data, config.split, out, options, histories, engine, columns, fit)
