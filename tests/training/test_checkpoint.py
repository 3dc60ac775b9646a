"""Checkpoints: the pointer always names a whole, verified file."""

from __future__ import annotations

import json

import pytest
import torch

from twotower.errors import DataError
from twotower.storage import sha256_file
from twotower.training.checkpoint import CheckpointStore


def test_save_then_load_round_trips_and_removes_stale_files(tmp_path):
    store = CheckpointStore(tmp_path)
    store.save("last", {"w": torch.arange(3), "epoch": 1}, serial=1)
    store.save("last", {"w": torch.arange(4), "epoch": 2}, serial=2)
    state = store.load("last")
    assert state["epoch"] == 2 and torch.equal(state["w"], torch.arange(4))
    assert sorted(p.name for p in tmp_path.glob("last-*.pt")) == ["last-000002.pt"]


def test_a_corrupt_file_is_refused(tmp_path):
    store = CheckpointStore(tmp_path)
    path = store.save("best", {"w": torch.ones(2)}, serial=1)
    path.write_bytes(path.read_bytes()[:-10] + b"0123456789")
    with pytest.raises(DataError, match="checksum"):
        store.load("best")


def test_missing_pointer_or_file_names_the_path(tmp_path):
    store = CheckpointStore(tmp_path)
    with pytest.raises(DataError, match="no checkpoint 'last'"):
        store.load("last")
    path = store.save("last", {"w": torch.ones(1)}, serial=1)
    path.unlink()
    with pytest.raises(DataError, match="missing"):
        store.load("last")


def test_a_crash_before_the_pointer_moves_keeps_the_old_checkpoint(tmp_path, monkeypatch):
    store = CheckpointStore(tmp_path)
    store.save("last", {"epoch": 1}, serial=1)
    real_dumps = json.dumps

    def crash(*args, **kwargs):  # dies after the new file is written, before the pointer
        raise KeyboardInterrupt

    monkeypatch.setattr(json, "dumps", crash)
    with pytest.raises(KeyboardInterrupt):
        store.save("last", {"epoch": 2}, serial=2)
    monkeypatch.setattr(json, "dumps", real_dumps)
    assert store.load("last")["epoch"] == 1


class Payload:
    """An arbitrary object: loading it would need pickle."""


def test_objects_that_need_pickle_are_refused(tmp_path):
    store = CheckpointStore(tmp_path)
    path = tmp_path / "evil-000001.pt"
    torch.save({"x": Payload()}, path)
    (tmp_path / "evil.json").write_text(
        json.dumps({"file": path.name, "sha256": sha256_file(path)})
    )
    with pytest.raises(DataError, match="not a readable checkpoint"):
        store.load("evil")
