"""What only the DuckDB engine has: its memory limit."""

from __future__ import annotations

import pytest

from twotower.data.build.duckdb import DuckDBEngine
from twotower.data.build.engine import build_split
from twotower.data.build.job import BuildOptions, Histories
from twotower.errors import DataError

pytest.importorskip("duckdb")


def test_running_out_of_memory_is_one_line_and_leaves_nothing(generated, tmp_path, splits):
    options = BuildOptions(threads=1)
    histories = Histories({"history": 50})
    engine = DuckDBEngine(memory_limit="1MB")
    with pytest.raises(
        DataError,
        match=r"DuckDB ran out of memory under memory_limit 1MB .*; "
        r"raise --memory-limit, or lower --threads",
    ):
        build_split(generated, splits["random"], tmp_path / "b", options, histories, engine)
    assert not (tmp_path / "b").exists()
