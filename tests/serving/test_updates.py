"""Items changed in place: each update a whole new version, blocked items never returned
(every index kind, every query source), removed ones unknown, new ones placed by their
features, and what a killed update left never read."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from twotower.errors import DataError
from twotower.export import export_run
from twotower.serving import Artifact, Retriever
from twotower.serving.item_changes import _same, _same_rows
from twotower.serving.query import Query, UnknownItemError
from twotower.serving.query_vectors import read_query_vectors, write_query_vectors
from twotower.serving.stores.base import Event
from twotower.serving.updates import (
    ItemChange,
    apply_update,
    prepare_update,
    write_update,
)
from twotower.storage import sha256_file

ROOT = Path(__file__).resolve().parents[2]
KINDS = ["exact", "flat", "hnsw", "ivfpq"]
INDEX_EXACT = {"exact": True, "flat": True, "hnsw": False, "ivfpq": False}


@pytest.fixture
def copy(demo_artifact, tmp_path) -> Path:
    """A private copy of the session's demo artifact."""
    return Path(shutil.copytree(demo_artifact[0], tmp_path / "artifact"))


def changed_rows(artifact: Artifact) -> list[dict]:
    """Items 0 and 1 with new titles and prices, and a new item (id 900) copying item
    2's other columns."""
    rows = artifact.items.slice(0, 3).to_pylist()
    rows[0]["title"], rows[1]["price"] = "a quite different title", 999.0
    new = {**rows[2], artifact.item_key: 900}
    return [rows[0], rows[1], new]


def ids_of(artifact: Artifact, rows: list[int]) -> list:
    return artifact.item_id_values[rows].tolist()


def test_an_update_is_the_next_version_and_leaves_the_export_untouched(copy):
    artifact = Artifact.load(copy)
    before = {name: sha256_file(copy / name) for name in artifact.manifest["files"]}
    assert (artifact.version, artifact.manifest["updates"]) == (1, [])
    blocked, removed = ids_of(artifact, [5, 6])
    change = ItemChange(rows=changed_rows(artifact), block=[blocked], remove=[str(removed)])
    update = prepare_update(artifact, change)
    assert update.counts() == {
        "added": 1,
        "replaced": 2,
        "blocked": 1,
        "unblocked": 0,
        "removed": 1,
    }
    assert update.removed == (removed,)  # as the table spells it: an int
    manifest = write_update(copy, update)
    assert manifest["version"] == 2 and manifest["base_fingerprint"] == artifact.fingerprint
    (entry,) = manifest["updates"]
    assert entry["folder"] == "updates/000002" and entry["added"] == 1 and "T" in entry["created"]
    assert json.loads((copy / "manifest.json").read_text()) == manifest
    for name, digest in before.items():  # the export's files: listed, never rewritten
        assert manifest["files"][name] == digest == sha256_file(copy / name)
    names = {"items.parquet", "item_vectors.npy", "change.json"}
    assert {f"updates/000002/{n}" for n in names} <= set(manifest["files"])
    change = json.loads((copy / "updates/000002/change.json").read_text())
    assert change == {"blocked": [blocked], "unblocked": [], "removed": [removed]}
    loaded = Artifact.load(copy)
    assert loaded.version == 2 and loaded.base_fingerprint == artifact.fingerprint
    assert loaded.fingerprint != artifact.fingerprint


def test_loading_equals_applying_in_memory(copy):
    """Two updates loaded from disk give the catalogue that applying them gave."""
    artifact = Artifact.load(copy)
    first = prepare_update(artifact, ItemChange(rows=changed_rows(artifact), block=[900]))
    second_artifact = apply_update(artifact, first)
    keys = ids_of(artifact, [0, 7])
    second = prepare_update(second_artifact, ItemChange(unblock=[900], remove=[keys[1]]))
    third_artifact = apply_update(second_artifact, second)
    loaded = Artifact.load(copy)
    assert loaded.fingerprint == third_artifact.fingerprint and loaded.version == 3
    for name in ("slot_rows", "row_slots", "blocked", "removed", "item_vectors"):
        mine, theirs = getattr(third_artifact.catalogue, name), getattr(loaded.catalogue, name)
        np.testing.assert_array_equal(mine, theirs, err_msg=name)
    assert loaded.items.equals(third_artifact.items)
    rows = loaded.item_rows([keys[0], 900, keys[1]])
    assert rows.tolist() == [0, 100, -1]
    assert loaded.items.column("title")[0].as_py() == "a quite different title"
    np.testing.assert_array_equal(loaded.item_vectors[[0, 1, 100]], first.vectors)
    assert not np.array_equal(loaded.item_vectors[0], artifact.item_vectors[0])
    # the in-memory artifacts share the users and towers of the first
    assert third_artifact.query_tower is artifact.query_tower
    assert third_artifact.queries is artifact.queries


def test_the_item_tower_embeds_as_the_export_did(copy, demo_artifact):
    """Rows given again unchanged are not embedded; changed ones are, by the artifact's
    own item tower, as the run's model embeds them."""
    artifact = Artifact.load(copy)
    _, oracle = demo_artifact
    same = artifact.items.slice(10, 5)
    update = prepare_update(artifact, ItemChange(rows=same))
    assert update.empty and update.unchanged == 5
    with pytest.raises(ValueError, match="changes nothing"):
        write_update(copy, update)
    rows = artifact.items.slice(10, 5).to_pylist()
    for row in rows:
        row["views"] = row["views"] + 0.0  # the same values, another object: unchanged
    rows[0]["views"] = rows[0]["views"] + 1000
    update = prepare_update(artifact, ItemChange(rows=rows))
    assert (update.unchanged, update.replaced, update.rows.num_rows) == (4, 1, 1)
    unchanged = prepare_update(artifact, ItemChange(rows=artifact.items.slice(20, 3)))
    assert unchanged.vectors.shape == (0, artifact.item_vectors.shape[1])
    # the item tower itself gives the exported vectors for the exported rows
    from twotower.towers.model import embed_rows

    vectors = embed_rows(artifact.item_tower, artifact.pipeline, "item", artifact.items).numpy()
    np.testing.assert_allclose(vectors, oracle.item_vectors, atol=1e-6)


def test_a_new_item_is_placed_by_its_other_features(copy):
    """A new id reads the id table's out-of-vocabulary row; an item whose other columns
    copy an existing item's lands next to it."""
    artifact = Artifact.load(copy)
    rows = artifact.items.slice(0, 40).to_pylist()
    news = [{**row, "item_id": 10_000 + i} for i, row in enumerate(rows)]
    update = prepare_update(artifact, ItemChange(rows=news))
    ids = artifact.pipeline.transform("item", update.rows)["item_id"]
    assert (ids == 1).all()  # OOV: no trained row of its own
    own = artifact.item_vectors[:40]
    cosines = (update.vectors * own).sum(axis=1)
    everyone = update.vectors @ artifact.item_vectors.T  # (40, 100)
    rank = (everyone > cosines[:, None]).sum(axis=1)  # items nearer than its original
    assert np.median(cosines) > 0.9 and (rank <= 2).mean() >= 0.8, (cosines, rank)
    assert np.median(cosines) > np.median(everyone) + 0.3


@pytest.fixture(scope="module")
def kinds(demo_artifact, text_artifact, tmp_path_factory) -> dict[tuple[str, str], Path]:
    """The demo run and the text run, each exported with every index kind."""
    pytest.importorskip("faiss", reason="FAISS indexes need faiss-cpu (the serve extra)")
    folder = Path(tmp_path_factory.mktemp("kinds"))
    runs = {"demo": demo_artifact[1].run_dir, "text": text_artifact[1]}
    out = {}
    for name, run in runs.items():
        for kind in KINDS:
            export_run(run, folder / f"{name}-{kind}", index=kind)
            out[name, kind] = folder / f"{name}-{kind}"
    return out


def answered(retriever: Retriever, k: int = 10) -> dict[str, list[list]]:
    """The items each kind of query returns: users, rows, texts (a text artifact)
    or items like the first 30."""
    artifact = retriever.artifact
    out = {}
    if retriever.query_columns != ["text"]:
        users = artifact.queries.column(artifact.query_key).to_pylist()[:60]
        out["users"] = [r.items for r in retriever.recall_users(users, k)]
        rows = artifact.queries.slice(0, 30).select(retriever.query_columns)
        out["rows"] = [r.items for r in retriever.recall_rows(rows, k)]
    else:
        texts = sorted(set(artifact.queries.column("text").to_pylist()))
        out["texts"] = [r.items for r in retriever.recall_text(texts, k)]
    known = artifact.item_rows(artifact.item_id_values[:30].tolist()) >= 0
    items = artifact.item_id_values[:30][known].tolist()
    out["items"] = [retriever.similar_items(i, k).items for i in items]
    return out


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("run", ["demo", "text"])
def test_a_blocked_item_is_never_returned_and_unblocked_comes_back(kinds, tmp_path, run, kind):
    folder = Path(shutil.copytree(kinds[run, kind], tmp_path / "artifact"))
    artifact = Artifact.load(folder)
    before = answered(Retriever(artifact))
    counts: dict = {}
    for lists in before.values():
        for items in lists:
            for item in items:
                counts[item] = counts.get(item, 0) + 1
    popular = sorted(counts, key=counts.get, reverse=True)[:8]  # the most answered items
    blocked = apply_update(artifact, prepare_update(artifact, ItemChange(block=popular)))
    for version in (blocked, Artifact.load(folder)):  # in memory, and loaded from disk
        retriever = Retriever(version)
        for source, lists in answered(retriever).items():
            found = {item for items in lists for item in items}
            assert not found & set(popular), (source, found & set(popular))
            assert all(len(items) == 10 for items in lists), source
        # a blocked item is still known: a query for it works
        assert len(retriever.similar_items(popular[0], 5).items) == 5
    unblocked = apply_update(blocked, prepare_update(blocked, ItemChange(unblock=popular)))
    assert unblocked.version == 3
    if INDEX_EXACT[kind]:  # the same answers as before the block
        assert answered(Retriever(unblocked)) == before
        assert answered(Retriever(Artifact.load(folder))) == before
    else:
        after = answered(Retriever(unblocked))
        returned = {item for lists in after.values() for items in lists for item in items}
        assert set(popular) & returned


@pytest.mark.parametrize("kind", KINDS)
def test_a_removed_item_is_unknown_and_never_returned(kinds, tmp_path, kind):
    folder = Path(shutil.copytree(kinds["demo", kind], tmp_path / "artifact"))
    artifact = Artifact.load(folder)
    retriever = Retriever(artifact)
    user = artifact.queries.column(artifact.query_key)[0].as_py()
    top = retriever.recall_users([user], 3)[0].items
    removed = apply_update(artifact, prepare_update(artifact, ItemChange(remove=top)))
    for version in (removed, Artifact.load(folder)):
        retriever = Retriever(version)
        assert not set(retriever.recall_users([user], 20)[0].items) & set(top)
        with pytest.raises(UnknownItemError):
            retriever.similar_items(top[0], 3)
        assert version.item_rows(top).tolist() == [-1, -1, -1]
        refused = retriever.ingest([Event(user=user, item=top[1], timestamp=1.0)])
        assert refused == [(0, f"unknown item id {top[1]!r}")]
        (answer,) = retriever.retrieve([Query(user=user, k=5, history=[top[0]])])
        assert isinstance(answer, UnknownItemError)  # a request naming it: unknown
    with pytest.raises(DataError, match="cannot block item"):
        prepare_update(removed, ItemChange(block=[top[0]]))
    nothing = prepare_update(removed, ItemChange(remove=[top[0]]))  # removed already
    assert nothing.empty


def test_rows_and_ids_are_checked_and_named(copy):
    artifact = Artifact.load(copy)
    row = artifact.items.slice(0, 1).to_pylist()[0]
    key = artifact.item_key
    other = {k: v for k, v in row.items() if k != "genres"}
    cases = [
        (ItemChange(rows=[row, other]), r"the item rows, row 1: lacks column\(s\) 'genres'"),
        (ItemChange(rows=[{**row, "colour": "red"}]), r"column\(s\) 'colour' are not the item"),
        (ItemChange(rows=[{**row, "price": "cheap"}]), r"row 0: feature 'price': 'cheap' is not"),
        (ItemChange(rows=[{**row, key: None}]), r"row 0: no item id \(column 'item_id'\)"),
        (ItemChange(rows=[row, {**row, key: str(row[key])}]), r"given twice \(row 0 and row 1\)"),
        (ItemChange(block=[123456]), r"cannot block item\(s\) the artifact does not know: 123456"),
        (ItemChange(unblock=["x"]), "cannot unblock item"),
        (ItemChange(remove=[123456]), "cannot remove item.* never held: 123456"),
        (ItemChange(block=[row[key]], unblock=[str(row[key])]), "both to block and to unblock"),
        (ItemChange(rows=[row], remove=[row[key]]), "given as rows and to remove"),
    ]
    for change, message in cases:
        with pytest.raises(DataError, match=message):
            prepare_update(artifact, change)
    # converted where nothing is lost: an integer price is a price
    update = prepare_update(artifact, ItemChange(rows=[{**row, "price": 7, key: 777}]))
    assert update.rows.schema == artifact.items.schema and update.added == 1
    # a new item may be blocked by the change that adds it
    update = prepare_update(artifact, ItemChange(rows=[{**row, key: 778}], block=["778"]))
    assert update.blocked == (778,)


def test_an_update_prepared_on_another_version_is_refused(copy):
    artifact = Artifact.load(copy)
    first = prepare_update(artifact, ItemChange(block=ids_of(artifact, [1])))
    late = prepare_update(artifact, ItemChange(block=ids_of(artifact, [2])))
    apply_update(artifact, first)
    with pytest.raises(DataError, match="now holds version 2 .* prepare it again"):
        write_update(copy, late)
    assert Artifact.load(copy).version == 2


def test_what_a_killed_update_left_is_not_read_and_the_next_one_removes_it(copy):
    artifact = Artifact.load(copy)
    expected = Retriever(artifact).similar_items(ids_of(artifact, [3])[0], 5)
    leftover = copy / "updates" / "000002"
    leftover.mkdir(parents=True)
    (leftover / "items.parquet").write_bytes(b"half a file")
    (copy / ".manifest.json.x7k2.tmp").write_bytes(b"{")
    loaded = Artifact.load(copy)  # no error: the previous version
    assert loaded.fingerprint == artifact.fingerprint
    assert Retriever(loaded).similar_items(ids_of(artifact, [3])[0], 5) == expected
    (copy / "updates" / "000007").mkdir()
    (copy / "updates" / "000007" / "x").write_bytes(b"?")
    apply_update(artifact, prepare_update(artifact, ItemChange(block=ids_of(artifact, [3]))))
    assert not (copy / ".manifest.json.x7k2.tmp").exists()
    assert sorted(p.name for p in (copy / "updates").iterdir()) == ["000002"]
    assert Artifact.load(copy).version == 2
    # anything else unlisted is still refused
    (copy / "updates" / "000002" / "extra").write_bytes(b"?")
    with pytest.raises(DataError, match="extra: not listed in manifest.json"):
        Artifact.load(copy)


KILL = """
import os, signal, sys
from pathlib import Path
import twotower.serving.updates as updates
from twotower.serving import Artifact
from twotower.serving.updates import ItemChange, prepare_update
from twotower.storage import atomic_write

folder, moment = Path(sys.argv[1]), sys.argv[2]

def die(*args):
    os.kill(os.getpid(), signal.SIGKILL)

def killed(path, manifest):
    if moment == "inside":  # mid-write: a temporary manifest beside the real one
        atomic_write(path / "manifest.json", lambda f: (f.write(b"{"), f.flush(), die()))
    die()

updates.write_manifest = killed  # the update's files are written, then the process dies
artifact = Artifact.load(folder)
rows = artifact.items.slice(0, 2).to_pylist()
rows[0]["title"] = "changed"
block = artifact.item_id_values[[4]].tolist()
updates.write_update(folder, prepare_update(artifact, ItemChange(rows=rows, block=block)))
"""


@pytest.mark.parametrize("moment", ["before", "inside"])
def test_an_update_killed_before_its_manifest_leaves_the_previous_version(copy, moment):
    """SIGKILL once every file of the new version is written, before (or while) the
    manifest is: the previous version loads and answers; the next update succeeds."""
    artifact = Artifact.load(copy)
    retriever = Retriever(artifact)
    user = artifact.queries.column(artifact.query_key)[0].as_py()
    expected = retriever.recall_users([user], 10)[0].items
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    done = subprocess.run(
        [sys.executable, "-c", KILL, str(copy), moment], env=env, capture_output=True, timeout=300
    )
    assert done.returncode == -9, done.stderr.decode()[-2000:]
    assert (copy / "updates" / "000002" / "change.json").is_file()  # left behind
    assert any(p.name.startswith(".manifest.json.") for p in copy.iterdir()) == (moment == "inside")
    loaded = Artifact.load(copy)
    assert loaded.fingerprint == artifact.fingerprint and loaded.version == 1
    assert Retriever(loaded).recall_users([user], 10)[0].items == expected
    top = expected[0]
    after = apply_update(loaded, prepare_update(loaded, ItemChange(block=[top])))
    assert after.version == 2
    reloaded = Artifact.load(copy)
    assert reloaded.fingerprint == after.fingerprint
    assert top not in Retriever(reloaded).recall_users([user], 10)[0].items
    assert not [p for p in copy.iterdir() if p.name.endswith(".tmp")]


def test_precomputed_query_vectors_serve_every_version(copy, tmp_path):
    artifact = Artifact.load(copy)
    path = tmp_path / "vectors.parquet"
    write_query_vectors(artifact, path)
    later = apply_update(
        artifact, prepare_update(artifact, ItemChange(block=ids_of(artifact, [0])))
    )
    vectors = read_query_vectors(path, Artifact.load(copy))  # the users did not change
    assert vectors.present.all() and later.base_fingerprint == artifact.fingerprint


def test_a_retriever_over_the_next_version_answers_as_one_loaded_afresh(copy):
    artifact = Artifact.load(copy)
    retriever = Retriever(artifact)
    user = artifact.queries.column(artifact.query_key)[0].as_py()
    before = retriever.recall_users([user], 10)[0]
    change = ItemChange(rows=changed_rows(artifact), block=before.items[:2])
    later = retriever.with_artifact(apply_update(artifact, prepare_update(artifact, change)))
    fresh = Retriever(Artifact.load(copy))
    assert later.recall_users([user], 10) == fresh.recall_users([user], 10)
    assert later.similar_items(900, 5) == fresh.similar_items(900, 5)
    assert later.sources.known_inputs is retriever.sources.known_inputs  # shared, not rebuilt
    assert retriever.recall_users([user], 10)[0] == before  # the old one answers as before


def test_the_item_tower_of_another_export_is_refused(copy, demo_artifact):
    artifact = Artifact.load(copy)
    (copy / "item_tower.pt").write_bytes(b"another export")
    with pytest.raises(DataError, match="no longer the item tower of artifact"):
        prepare_update(artifact, ItemChange(rows=changed_rows(artifact)))


def test_ids_keep_their_type_however_given(float_key_artifact, tmp_path):
    """Float keys: ids given as text find their items; change.json spells them as the
    table does."""
    folder = Path(shutil.copytree(float_key_artifact, tmp_path / "artifact"))
    artifact = Artifact.load(folder)
    update = prepare_update(artifact, ItemChange(block=["1.5"], remove=[2.5]))
    assert update.blocked == (1.5,) and update.removed == (2.5,)
    later = apply_update(artifact, update)
    assert later.item_rows([1.5, 2.5]).tolist() == [1, -1]
    assert Artifact.load(folder).item_rows(["1.5"]).tolist() == [1]
    table = pa.table({"i": [100.5], "title": ["red shoes 9"]})
    added = apply_update(later, prepare_update(later, ItemChange(rows=table)))
    assert added.item_rows(["100.5"]).tolist() == [27]
    assert added.items.column("title")[27].as_py() == "red shoes 9"


def test_rows_are_compared_column_by_column_as_values_are():
    """Equal rows are found in Arrow (null equals null, NaN equals NaN) as the
    value-by-value comparison finds them, lists included."""
    values = [1.0, 2.0, float("nan"), None]

    def table(seed: int) -> pa.Table:
        pick = np.random.default_rng(seed).integers(0, 4, size=(200, 3))
        return pa.table(
            {
                "price": pa.array([values[i] for i in pick[:, 0]], pa.float64()),
                "title": pa.array([[None, "a", "b", "a"][i] for i in pick[:, 1]]),
                "tags": pa.array([[None, [], ["x"], ["x", "y"]][i] for i in pick[:, 2]]),
            }
        )

    new = table(1)
    old = pa.concat_tables([new.slice(0, 100), table(2).slice(100)])  # half the same
    expected = [
        all(_same(a[c], b[c]) for c in a)
        for a, b in zip(new.to_pylist(), old.to_pylist(), strict=True)
    ]
    assert _same_rows(new, old).tolist() == expected
    assert all(expected[:100]) and not all(expected[100:])
