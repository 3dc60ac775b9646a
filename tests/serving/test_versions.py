"""A served artifact moved to the folder's next version in place: equal to the folder
loaded whole, only when the folder holds exactly that version, its files checked."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from twotower.errors import DataError
from twotower.export import export_run
from twotower.serving import Artifact
from twotower.serving.item_changes import ItemChange, prepare_update
from twotower.serving.updates import apply_update
from twotower.serving.versions import next_version


@pytest.fixture
def folder(demo_artifact, tmp_path) -> Path:
    return Path(shutil.copytree(demo_artifact[0], tmp_path / "artifact"))


def _between(calls: list):
    """A stand-in for ``MicroBatcher.between`` that records each call."""

    def between(task):
        calls.append(task)
        return task()

    return between


def _changed(artifact: Artifact, item_id: int, block: list) -> ItemChange:
    row = {**artifact.items.slice(0, 1).to_pylist()[0], artifact.item_key: item_id}
    return ItemChange(rows=[row], block=block)


def test_the_next_version_applied_in_place_equals_the_folder_loaded_whole(folder, demo_artifact):
    served = Artifact.load(folder)
    offline = Artifact.load(folder)  # another writer, as twotower export --update
    blocked = demo_artifact[1].item_ids[:3]
    apply_update(offline, prepare_update(offline, _changed(offline, 900_200, blocked)))
    calls: list = []
    updated = next_version(served, _between(calls))
    whole = Artifact.load(folder)
    assert len(calls) == 1  # the index grew in the one call that may grow it
    assert (updated.version, updated.fingerprint) == (2, whole.fingerprint)
    assert updated.items.equals(whole.items)
    np.testing.assert_array_equal(updated.item_vectors, whole.item_vectors)
    np.testing.assert_array_equal(updated.catalogue.live, whole.catalogue.live)
    queries = whole.item_vectors[:5]
    rows, scores, _ = updated.catalogue.search(queries, 10)
    expected_rows, expected_scores, _ = whole.catalogue.search(queries, 10)
    np.testing.assert_array_equal(rows, expected_rows)
    np.testing.assert_allclose(scores, expected_scores, rtol=1e-6)
    served_rows, _, _ = served.catalogue.search(queries, 1000)  # the old one answers as before
    assert served_rows.max() < served.catalogue.num_items


def test_only_the_version_right_after_is_applied_in_place(folder, demo_artifact):
    served = Artifact.load(folder)
    assert next_version(served, _between([])) is None  # the same version
    writer = Artifact.load(folder)
    for item in demo_artifact[1].item_ids[:2]:  # two versions on
        writer = apply_update(writer, prepare_update(writer, ItemChange(block=[item])))
    assert next_version(served, _between([])) is None
    export_run(demo_artifact[1].run_dir, folder)  # another export
    assert next_version(writer, _between([])) is None


def test_a_served_index_grown_past_its_version_is_not_grown_again(folder, demo_artifact):
    """After a reload that failed in another worker, the served index holds a version
    the served catalogue does not: only a whole load can follow."""
    served = Artifact.load(folder)
    writer = Artifact.load(folder)
    apply_update(writer, prepare_update(writer, _changed(writer, 900_201, [])))
    assert next_version(served, _between([])) is not None  # grew the served index
    assert next_version(served, _between([])) is None


def test_a_corrupt_file_of_the_next_version_is_named(folder, demo_artifact):
    served = Artifact.load(folder)
    writer = Artifact.load(folder)
    written = apply_update(writer, prepare_update(writer, _changed(writer, 900_202, [])))
    vectors = folder / written.manifest["updates"][-1]["folder"] / "item_vectors.npy"
    vectors.write_bytes(vectors.read_bytes()[:-4] + b"\0\0\0\0")
    with pytest.raises(DataError, match="item_vectors.npy: corrupt"):
        next_version(served, _between([]))
    assert served.version == 1 and served.catalogue.index.num_items == served.catalogue.slots
