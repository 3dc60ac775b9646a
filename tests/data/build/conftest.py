"""The engines under test: every engine in ``ENGINES``, Spark on one local session
shared by the whole test run (skipped, with the reason, without PySpark or Java 17)."""

from __future__ import annotations

import importlib.util
import re
import shutil
import subprocess

import pytest

from twotower.data.build.engine import ENGINES


def _java_major() -> int:
    """The installed Java's major version, 0 if none."""
    if shutil.which("java") is None:
        return 0
    shown = subprocess.run(["java", "-version"], capture_output=True, text=True).stderr
    found = re.search(r'version "(\d+)(?:\.(\d+))?', shown)
    if found is None:
        return 0
    major = int(found.group(1))
    return int(found.group(2) or 0) if major == 1 else major  # "1.8" is Java 8


def spark_missing() -> str | None:
    """Why Spark cannot run here, or None."""
    if importlib.util.find_spec("pyspark") is None:
        return "PySpark is not installed (pip install 'twotower[spark]')"
    if _java_major() < 17:
        return "Spark needs Java 17 or later (apt-get install openjdk-17-jre-headless)"
    return None


@pytest.fixture(scope="session")
def spark():
    """One local[2] session for the run (a build reuses an active session)."""
    reason = spark_missing()
    if reason is not None:
        pytest.skip(reason)
    from pyspark.sql import SparkSession

    session = (
        SparkSession.builder.master("local[2]")
        .config("spark.ui.enabled", "false")
        .config("spark.sql.shuffle.partitions", "4")
        .getOrCreate()
    )
    session.sparkContext.setLogLevel("ERROR")
    yield session
    session.stop()


@pytest.fixture(params=sorted(ENGINES))
def engine(request) -> str:
    """The name of each registered engine, ready to build."""
    if request.param == "spark":
        request.getfixturevalue("spark")
    return request.param
