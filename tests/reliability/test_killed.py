"""Processes killed with SIGKILL at random moments lose nothing.

- A training run killed twice (once after its first checkpoint, once at a uniformly
  random moment of a resumed run), then resumed with ``--resume``, ends with exactly
  the metrics of an uninterrupted run; after every kill each checkpoint on disk is
  whole (its checksum verifies) and the run's leftovers are cleaned up by the next start.
- An export killed at random moments always leaves a whole artifact at ``out``.
- An update (``twotower export --update``) killed at random moments always leaves one
  whole version, and the next update completes it.

The moments are drawn from a fresh seed each time (so repeated runs cover different
ones) and the seed is named in every failure; ``TWOTOWER_KILL_SEED`` replays one.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from twotower.serving import Artifact, Retriever
from twotower.training.checkpoint import CheckpointStore

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "configs" / "synthetic.yaml"
SETTINGS = [
    "data.synthetic.num_queries=400",
    "data.synthetic.num_items=200",
    "data.synthetic.interactions_per_query=10",
    "model.query.widths=[32]",
    "model.item.widths=[32]",
    "training.epochs=6",
    "training.patience=0",
    "training.batch_size=64",
    "training.tensorboard=false",
    "training.ks=[10]",
]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src")}


@pytest.fixture
def rng() -> tuple[random.Random, int]:
    seed = int(os.environ.get("TWOTOWER_KILL_SEED") or int.from_bytes(os.urandom(4), "big"))
    return random.Random(seed), seed


def _train_command(out: Path, resume: bool) -> list[str]:
    sets = [arg for setting in SETTINGS for arg in ("--set", setting)]
    command = [sys.executable, "-m", "twotower", "train", str(CONFIG), "--out", str(out), *sets]
    return [*command, "--resume"] if resume else command


def _run(command: list[str]) -> float:
    """Runs a command to the end; returns its wall time."""
    clock = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, env=ENV, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return time.perf_counter() - clock


def _kill_after(command: list[str], delay: float, ready: Path | None = None) -> bool:
    """Starts a command, waits for ``ready`` to exist (if given), then ``delay`` seconds,
    and kills it with SIGKILL; returns whether it was still running when killed."""
    process = subprocess.Popen(
        command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ENV
    )
    try:
        deadline = time.monotonic() + 600
        while ready is not None and not ready.exists() and process.poll() is None:
            assert time.monotonic() < deadline, f"{ready} never appeared"
            time.sleep(0.01)
        try:
            process.wait(timeout=delay)
            return False
        except subprocess.TimeoutExpired:
            process.kill()  # SIGKILL: no handler, no cleanup
            return True
    finally:
        process.wait()


def _assert_checkpoints_whole(out: Path, note: str) -> None:
    store = CheckpointStore(out / "checkpoints")
    for name in ("last", "best"):
        if store.exists(name):
            state = store.load(name)  # verifies the checksum, then reads without pickle
            assert "model" in state, note


def _leftovers(folder: Path) -> list[Path]:
    return [p for p in folder.rglob(".*.tmp")] if folder.exists() else []


def test_killed_training_resumes_to_the_uninterrupted_metrics(tmp_path, rng):
    rng, seed = rng
    straight = tmp_path / "straight"
    seconds = _run(_train_command(straight, resume=False))
    expected = json.loads((straight / "metrics.json").read_text())

    out = tmp_path / "killed"
    # First kill: somewhere in the epoch after the first checkpoint (or in its writing).
    delay = rng.uniform(0, seconds / 6)
    killed = _kill_after(_train_command(out, False), delay, ready=out / "checkpoints/last.json")
    note = f"seed {seed}: first kill {delay:.2f} s after the first checkpoint"
    _assert_checkpoints_whole(out, note)
    # Second kill: a resumed run, killed at a uniformly random moment of its life.
    second = rng.uniform(0, seconds)
    killed_again = _kill_after(_train_command(out, True), second)
    note += f", second {second:.2f} s into the resumed run (killed: {killed}, {killed_again})"
    _assert_checkpoints_whole(out, note)

    _run(_train_command(out, resume=True))
    assert json.loads((out / "metrics.json").read_text()) == expected, note
    records = (out / "metrics.jsonl").read_text().splitlines()
    epochs = [json.loads(line)["epoch"] for line in records]
    assert epochs == [1, 2, 3, 4, 5, 6], note
    assert _leftovers(out) == [], note


def test_resume_with_nothing_to_resume_starts_from_the_beginning(tmp_path):
    """A pipeline that always passes --resume, killed before the first checkpoint."""
    out = tmp_path / "run"
    _kill_after(_train_command(out, False), 0.0, ready=out / "config.yaml")
    assert not (out / "checkpoints" / "last.json").exists()
    _run(_train_command(out, resume=True))
    assert json.loads((out / "metrics.json").read_text())["best_epoch"] >= 1


def test_a_killed_export_leaves_a_whole_artifact(tmp_path, rng):
    rng, seed = rng
    run = tmp_path / "run"
    _run(_train_command(run, resume=False))
    out = tmp_path / "artifact"
    export = [sys.executable, "-m", "twotower", "export", str(run), "--out", str(out)]
    seconds = _run(export)
    artifact = Artifact.load(out)
    first = artifact.manifest
    user = artifact.queries.column(artifact.query_key)[0].as_py()
    expected = Retriever.load(out).recall_users([user], 5)[0].items
    delays = sorted(rng.uniform(0, seconds) for _ in range(4))
    for delay in delays:
        _kill_after(export, delay)
        note = f"seed {seed}: export killed {delay:.2f} s in (delays {delays})"
        artifact = Artifact.load(out)  # every file's checksum verified
        assert artifact.manifest["files"] == first["files"], note
        assert Retriever.load(out).recall_users([user], 5)[0].items == expected, note
    _run(export)
    beside = sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".artifact"))
    assert beside == [".artifact.lock"], f"seed {seed}: left beside the artifact: {beside}"


def test_a_killed_update_leaves_a_whole_version(tmp_path, rng):
    """``twotower export --update`` killed at random moments: the artifact always loads
    as version 1 or 2, answering as that version does; the update then runs to the end."""
    rng, seed = rng
    run = tmp_path / "run"
    _run(_train_command(run, resume=False))
    first = tmp_path / "first"
    _run([sys.executable, "-m", "twotower", "export", str(run), "--out", str(first)])
    artifact = Artifact.load(first)
    rows = artifact.items.slice(0, 20).to_pylist()
    for row in rows[:10]:
        row[artifact.item_key] += 100_000  # ten new items, ten changed ones
    for row in rows[10:]:
        row["title"] = f"{row['title']} (new edition)"
    pq.write_table(pa.Table.from_pylist(rows, artifact.items.schema), tmp_path / "changes.parquet")
    user = artifact.queries.column(artifact.query_key)[0].as_py()
    expected = {1: Retriever(artifact).recall_users([user], 10)[0].items}
    out = tmp_path / "artifact"

    def update() -> list[str]:
        return [sys.executable, "-m", "twotower", "export", "--update", str(out),
                "--items", str(tmp_path / "changes.parquet")]  # fmt: skip

    shutil.copytree(first, out)
    seconds = _run(update())
    expected[2] = Retriever.load(out).recall_users([user], 10)[0].items
    for delay in sorted(rng.uniform(0, seconds) for _ in range(4)):
        shutil.rmtree(out)
        shutil.copytree(first, out)
        killed = _kill_after(update(), delay)
        note = f"seed {seed}: update killed {delay:.2f} s in (killed: {killed})"
        loaded = Artifact.load(out)  # every listed file's checksum verified
        assert loaded.version in (1, 2), note
        assert Retriever(loaded).recall_users([user], 10)[0].items == expected[loaded.version], note
        _run(update())
        assert Retriever.load(out).recall_users([user], 10)[0].items == expected[2], note
        assert Artifact.load(out).version == 2, note
        assert not [p for p in out.rglob("*") if p.name.endswith(".tmp")], note
