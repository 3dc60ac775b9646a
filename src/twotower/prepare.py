"""The data commands: ``prepare_data`` (``twotower data prepare``) reads, splits and fits
the features of a config's data in memory and saves them; ``build_data`` (``twotower
data build``) builds it out of core. Runs read their data through ``twotower.sources``.
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
from twotower.data.splits import split_interactions
from twotower.features.specs import HistoryFeature
from twotower.features.streaming import fit_built_pipeline, save_fitted
from twotower.sources import MemorySource, read_dataset
from twotower.storage import sha256_file


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
    pipeline = MemorySource(dataset, split).fit_features(config).pipeline
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
