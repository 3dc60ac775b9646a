"""Choosing an engine: by name from ``ENGINES``, with its own settings, in one place."""

from __future__ import annotations

from pathlib import Path

import pytest

from twotower.data.build.engine import ENGINES, Engine, build_split, engine_named
from twotower.data.build.job import BuildJob, Built
from twotower.data.config import SplitConfig
from twotower.errors import ConfigError


def test_an_unknown_engine_is_refused_naming_the_valid_ones(generated, tmp_path):
    with pytest.raises(ConfigError, match=r"unknown engine 'polars'; choose duckdb or spark"):
        build_split(generated, SplitConfig(), tmp_path / "b", engine="polars")
    assert not (tmp_path / "b").exists()


def test_a_new_periods_training_examples_are_not_built(generated, tmp_path):
    with pytest.raises(ConfigError, match=r"split.train_from .* is for data in memory"):
        build_split(generated, SplitConfig(train_from=1.0), tmp_path / "b")
    assert not (tmp_path / "b").exists()


def test_new_items_are_not_built(generated, tmp_path):
    with pytest.raises(ConfigError, match=r"split.new_items .* is for data in memory"):
        build_split(generated, SplitConfig(new_items=0.1), tmp_path / "b")
    assert not (tmp_path / "b").exists()


def test_an_engine_takes_its_own_settings_and_no_others():
    assert engine_named("spark", master="local[1]").master == "local[1]"
    assert engine_named("duckdb", memory_limit="2GB").memory_limit == "2GB"
    # a setting left unset (None) keeps the engine's default, so one command line serves all
    assert engine_named("duckdb", memory_limit=None, master=None).memory_limit is None
    assert engine_named("spark", memory_limit=None, master=None).master == "local[2]"
    with pytest.raises(
        ConfigError, match=r"the duckdb engine has no setting master; its settings: memory_limit"
    ):
        engine_named("duckdb", master="local[1]")
    with pytest.raises(ConfigError, match=r"the spark engine has no setting memory_limit"):
        engine_named("spark", memory_limit="4GB")


def test_every_registered_engine_is_named_as_registered():
    for name, factory in ENGINES.items():
        engine = factory()
        assert engine.name == name and callable(engine.build)


def test_an_engine_object_is_used_as_given(generated, tmp_path):
    """Any object with the ``Engine`` interface builds; the manifest names it."""

    class Recording:
        name = "recording"

        def __init__(self) -> None:
            self.jobs: list[BuildJob] = []

        def build(self, job: BuildJob, staging: Path) -> Built:
            self.jobs.append(job)
            return Built({}, "before_event")

    engine: Engine = Recording()
    manifest = build_split(generated, SplitConfig(), tmp_path / "b", engine=engine)
    assert manifest["engine"] == "recording" and manifest["files"] == {}
    assert [job.data for job in engine.jobs] == [generated]
