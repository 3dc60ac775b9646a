"""Loading an artifact: every file verified, anything altered refused by name."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from twotower.errors import DataError
from twotower.serving import Artifact
from twotower.serving.artifact import REQUIRED_FILES


@pytest.fixture
def copy(demo_artifact, tmp_path) -> Path:
    """A private copy of the session's artifact, free to damage."""
    return Path(shutil.copytree(demo_artifact[0], tmp_path / "artifact"))


def edit_manifest(folder: Path, **changes) -> None:
    path = folder / "manifest.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def test_loaded_artifact_holds_what_the_run_knows(retriever, demo_artifact):
    _, oracle = demo_artifact
    artifact = retriever.artifact
    assert artifact.item_ids.to_pylist() == oracle.item_ids
    np.testing.assert_array_equal(artifact.item_vectors, oracle.item_vectors)
    np.testing.assert_array_equal(artifact.seen.toarray() > 0, oracle.seen)
    assert {"segment", "age", "sessions"} <= set(artifact.queries.column_names)
    assert {"title", "genres", "category"} <= set(artifact.items.column_names)
    assert not artifact.query_tower.training
    assert not any(p.requires_grad for p in artifact.query_tower.parameters())
    assert artifact.index.is_exact and artifact.index.num_items == 100
    ids = [oracle.query_ids[7], -3, oracle.query_ids[0]]
    assert artifact.query_rows(ids).tolist() == [7, -1, 0]
    assert artifact.item_rows([oracle.item_ids[42], "x"]).tolist() == [42, -1]


@pytest.mark.parametrize("name", sorted(REQUIRED_FILES) + ["index/vectors.npy"])
def test_a_flipped_byte_in_any_file_is_refused_naming_it(copy, name):
    path = copy / name
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(DataError, match=f"{name}: corrupt \\(its checksum does not match"):
        Artifact.load(copy)


def test_a_missing_file_is_refused_naming_it(copy):
    (copy / "seen.npz").unlink()
    with pytest.raises(DataError, match="seen.npz: missing, though manifest.json lists it"):
        Artifact.load(copy)


def test_an_unlisted_file_is_refused_naming_it(copy):
    (copy / "index" / "extra.bin").write_bytes(b"?")
    with pytest.raises(DataError, match="extra.bin: not listed in manifest.json"):
        Artifact.load(copy)


def test_a_manifest_without_a_required_file_is_refused(copy):
    files = json.loads((copy / "manifest.json").read_text())["files"]
    del files["query_tower.pt"]
    (copy / "query_tower.pt").unlink()
    edit_manifest(copy, files=files)
    with pytest.raises(DataError, match="does not list query_tower.pt, which every artifact"):
        Artifact.load(copy)


def test_a_listed_path_outside_the_artifact_is_refused(copy):
    files = json.loads((copy / "manifest.json").read_text())["files"]
    edit_manifest(copy, files={**files, "../elsewhere": "0" * 64})
    with pytest.raises(DataError, match="lists '../elsewhere', which is not a file of the"):
        Artifact.load(copy)


@pytest.mark.parametrize(
    ("version", "message"),
    [
        (4, "format version 4 is newer than 3, the one this version of twotower reads; upgrade"),
        (2, "format version 2 is not 3, the one .* reads; export the run again"),
        (1, "format version 1 is not 3, the one .* reads; export the run again"),
        ("3", "format version '3' is not 3"),
        (None, "format version None is not 3"),
    ],
)
def test_another_format_version_is_refused_naming_both(copy, version, message):
    edit_manifest(copy, format_version=version)
    with pytest.raises(DataError, match=f"manifest.json: artifact {message}"):
        Artifact.load(copy)


def test_a_manifest_disagreeing_with_the_files_is_refused(copy):
    edit_manifest(copy, num_items=99)
    with pytest.raises(DataError, match="items.parquet: expected 99 rows"):
        Artifact.load(copy)


def test_a_folder_without_a_manifest_is_not_an_artifact(tmp_path):
    with pytest.raises(DataError, match="manifest.json: missing; .* is not an exported artifact"):
        Artifact.load(tmp_path)
