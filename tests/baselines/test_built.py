"""Baselines on a data build: fitted from the build's query rows chunk by chunk, they
rank exactly as the in-memory baselines do on the same split."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from twotower.baselines.config import BaselinesConfig
from twotower.baselines.run import evaluate_baseline
from twotower.config import Config
from twotower.data.config import DataConfig, StreamConfig
from twotower.errors import DataError
from twotower.prepare import build_data
from twotower.sources import BuiltSource, MemorySource, load_data

pytest.importorskip("duckdb")

KS = [1, 5, 10, 50]


def _built(folder: Path) -> BuiltSource:
    """The build in ``folder`` alone, under a default config (what the baselines read)."""
    stream = StreamConfig(built=folder)
    return BuiltSource(Config(data=DataConfig(source="stream", stream=stream)))


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """The demo's tables (random split, so queries have several held-out items) and
    their build, in row groups of 64 queries."""
    from twotower.data.build.job import BuildOptions
    from twotower.demo import _write_synthetic, demo_config

    folder = tmp_path_factory.mktemp("demo")
    config = demo_config(
        ["data.synthetic.num_queries=300", "data.synthetic.num_items=150", "split.method=random"]
    )
    config = dataclasses.replace(config, data=_write_synthetic(config, folder / "data"))
    build_data(config, folder / "built", BuildOptions(rows_per_part=128, row_group_rows=64))
    return config, folder / "built"


@pytest.mark.parametrize("name", ["pop", "itemknn", "ease"])
def test_a_baseline_on_the_build_ranks_as_in_memory(demo, name):
    config, built = demo
    settings = BaselinesConfig(ease_l2=50.0, itemknn_neighbors=20, itemknn_shrink=1.0)
    dataset, split = load_data(config)
    expected = evaluate_baseline(name, MemorySource(dataset, split), KS, settings)
    got = evaluate_baseline(name, _built(built), KS, settings)
    assert got.keys() == expected.keys()
    assert got["test/queries"] == expected["test/queries"] > 100
    for key, value in expected.items():
        assert got[key] == pytest.approx(value, rel=1e-9, abs=1e-12), key


def test_a_baseline_too_large_for_memory_is_refused_naming_its_size(demo, monkeypatch):
    import os

    _, built = demo
    real = os.sysconf
    monkeypatch.setattr(os, "sysconf", lambda n: 1 if n == "SC_PHYS_PAGES" else real(n))
    with pytest.raises(DataError, match=r"ease on 150 items needs about 0.0 GiB \(three dense"):
        evaluate_baseline("ease", _built(built), KS)


@pytest.mark.parametrize(("name", "passes"), [("pop", 2), ("itemknn", 3), ("ease", 2)])
def test_each_query_file_is_read_once_to_fit_and_once_to_rank(demo, monkeypatch, name, passes):
    """EASE takes its counts from its Gram matrix's diagonal; only item-KNN reads a file
    once more, to count the co-occurrences it will hold before building them."""
    reads = []
    for method in ("held_out", "popularity"):  # each reads the part's query file through
        real = getattr(BuiltSource, method)

        def counted(self, part, *args, real=real, **kwargs):
            reads.append(self._queries(part))
            return real(self, part, *args, **kwargs)

        monkeypatch.setattr(BuiltSource, method, counted)
    _, built = demo
    source = _built(built)
    evaluate_baseline(name, source, KS, BaselinesConfig(ease_l2=50.0), parts=("test",))
    assert [path.name for path in reads] == ["queries_test.parquet"] * passes
