"""The build's engines behind one interface, and ``build_split``, which chooses one.

Every engine runs the same plan (``plan.py``) and writes the same files (tested equal);
what differs is where it runs: ``duckdb`` (one machine, out of core) or ``spark`` (a
cluster). An engine's own settings (DuckDB's ``memory_limit``, Spark's ``master``) are
its constructor's; what every build is asked is a ``BuildJob``.
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from twotower.data.build.duckdb import DuckDBEngine
from twotower.data.build.format import MANIFEST, write_build_manifest
from twotower.data.build.job import BuildJob, BuildOptions, Built, Histories
from twotower.data.build.parquet import Files
from twotower.data.build.spark import SparkEngine
from twotower.data.config import DataConfig, SplitConfig
from twotower.errors import ConfigError
from twotower.storage import replaced_folder


class Engine(Protocol):
    """A build engine: runs a ``BuildJob`` into a staging folder.

    Attributes:
        name: the engine's name in ``ENGINES`` and in the build's manifest.
    """

    name: str

    def build(self, job: BuildJob, staging: Path) -> Built:
        """Writes the build's files (``format.py``'s layout, without the manifest and
        the fitted features) into ``staging``.

        Raises:
            DataError: bad input, named; a part left empty by the split.
        """
        ...


# name -> the engine's constructor, whose keyword arguments are the engine's settings
ENGINES: dict[str, Callable[..., Engine]] = {"duckdb": DuckDBEngine, "spark": SparkEngine}


def engine_named(name: str, **settings: Any) -> Engine:
    """The engine registered as ``name``, made with ``settings`` (its constructor's
    keywords; a setting given as None keeps the engine's default).

    Raises:
        ConfigError: no engine of that name, or a setting the engine does not have;
            naming the valid ones.
    """
    if name not in ENGINES:
        raise ConfigError(f"unknown engine {name!r}; choose {' or '.join(ENGINES)}")
    factory = ENGINES[name]
    given = {key: value for key, value in settings.items() if value is not None}
    known = list(inspect.signature(factory).parameters)
    unknown = sorted(set(given) - set(known))
    if unknown:
        raise ConfigError(
            f"the {name} engine has no setting {', '.join(unknown)}; its settings: "
            f"{', '.join(known) or 'none'}"
        )
    return factory(**given)


def build_split(
    data: DataConfig,
    split: SplitConfig,
    out: Path,
    options: BuildOptions | None = None,
    histories: Histories | None = None,
    engine: Engine | str = "duckdb",
    columns: dict[str, list[str]] | None = None,
    finish: Callable[[Path], Files] | None = None,
) -> dict[str, Any]:
    """Splits the interactions ``data`` names into ``out`` (``format.py``'s layout),
    with ``histories``' list columns if given, on ``engine`` (an ``Engine``, or the
    name of one in ``ENGINES`` with its default settings: the same output).
    ``columns``: each side's feature columns (``query``: joined into every row from
    ``data.queries``; ``item``: written with the corpus to ``items.parquet``).
    ``finish``: called with the staging folder once the parts are written (it fits the
    features there); the files it returns (path relative to the folder -> rows and
    sha256) join the manifest. The folder appears whole or not at all
    (``storage.replaced_folder``).

    Returns:
        The manifest: each file's rows and sha256, each part's rows, the seconds taken.

    Raises:
        ConfigError: the data is not a ``files`` source; an unknown engine; a
            ``split.train_from``, ``split.new_items`` or ``split.new_items_valid``.
        DataError: a file is missing, unreadable or lacks a column; an id is empty; a
            part would be empty; ``out`` exists and is not a build.
    """
    if data.source != "files" or data.interactions is None:
        raise ConfigError(
            f"twotower data build reads data.source 'files' (data.interactions), not "
            f"{data.source!r}"
        )
    if split.train_from is not None:
        raise ConfigError(
            "split.train_from (training on a new period) is for data in memory; a data "
            "build does not mark it: leave it unset to build"
        )
    if split.holds_new_items:
        raise ConfigError(
            "split.new_items or new_items_valid (items held out of training) is for data "
            "in memory; a data build does not hold them out: leave both at 0 to build"
        )
    chosen = engine_named(engine) if isinstance(engine, str) else engine
    job = BuildJob(data, split, options or BuildOptions(), histories or Histories(), columns or {})
    clock = time.perf_counter()
    with replaced_folder(out, MANIFEST, "a data build") as staging:
        built = chosen.build(job, staging)
        files = dict(built.files)
        if finish is not None:
            files.update(finish(staging))
        lengths = job.histories.lengths
        seconds = time.perf_counter() - clock
        return write_build_manifest(
            staging, chosen.name, split, lengths, built.rule, job.outputs, files, seconds
        )
