"""``twotower data build --engine spark`` (local[2]) writes what the DuckDB build writes,
file for file: every split method, histories and latest histories, feature tables and
ids without a row, on generated data and MovieLens-100K. (Spark's side of the engines'
contract is ``test_engines.py``.)"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from twotower.data.build.engine import build_split
from twotower.data.build.format import read_build_manifest
from twotower.data.build.job import BuildOptions, Histories
from twotower.data.build.spark import SparkEngine
from twotower.data.config import SplitConfig

OPTIONS = BuildOptions(rows_per_part=1200, row_group_rows=300, threads=2)


def contents(folder: Path) -> dict[str, list]:
    """Every file's rows, by file, and the manifest's layout (files and row counts)."""
    manifest = read_build_manifest(folder)
    rows = {name: pq.read_table(folder / name).to_pylist() for name in manifest["files"]}
    layout = {name: entry["rows"] for name, entry in manifest["files"].items()}
    return {"rows": rows, "layout": layout, "parts": manifest["rows"]}


@pytest.mark.parametrize(
    ("method", "rule"),
    [("leave_last_out", "before_event"), ("random", "mask_target"), ("time", "before_event")],
)
def test_spark_writes_what_duckdb_writes(spark, generated, tmp_path, method, rule, splits):
    data = generated
    if rule == "mask_target":
        roles = dataclasses.replace(generated.interactions, timestamp=None)
        data = dataclasses.replace(generated, interactions=roles)
    split = splits[method]
    histories = Histories({"history": 5, "long": 30}, rule)
    build_split(data, split, tmp_path / "duckdb", OPTIONS, histories)
    build_split(data, split, tmp_path / "spark", OPTIONS, histories, engine=SparkEngine())
    assert contents(tmp_path / "spark") == contents(tmp_path / "duckdb")


def test_spark_and_duckdb_agree_on_movielens_100k(spark, ml100k_files, tmp_path):
    data = dataclasses.replace(ml100k_files, min_weight=4)
    split = SplitConfig(method="random", seed=0)
    histories = Histories({"history": 50})
    options = BuildOptions(rows_per_part=20_000, row_group_rows=5_000)
    build_split(data, split, tmp_path / "duckdb", options, histories)
    build_split(data, split, tmp_path / "spark", options, histories, engine="spark")
    assert contents(tmp_path / "spark") == contents(tmp_path / "duckdb")


def test_spark_joins_feature_tables_as_duckdb_does(spark, with_tables, tmp_path, splits):
    columns = {"query": ["user_id", "segment", "age"], "item": ["item_id", "category", "price"]}
    histories = Histories({"history": 6})
    for engine in ("duckdb", "spark"):
        out = tmp_path / engine
        build_split(with_tables, splits["random"], out, OPTIONS, histories, engine, columns=columns)
    assert contents(tmp_path / "spark") == contents(tmp_path / "duckdb")


@pytest.mark.parametrize("policy", ["drop", "impute"])
def test_spark_handles_missing_rows_as_duckdb_does(
    spark, items_missing_rows, tmp_path, splits, policy
):
    data = dataclasses.replace(items_missing_rows, on_missing_rows=policy)
    for engine in ("duckdb", "spark"):
        out = tmp_path / engine
        build_split(data, splits["random"], out, engine=engine, columns={"item": ["i", "kind"]})
    assert contents(tmp_path / "spark") == contents(tmp_path / "duckdb")
