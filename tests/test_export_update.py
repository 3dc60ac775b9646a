"""``twotower export --update``: an updated artifact equals a full export of the same
data, item by item and answer by answer; its files and the command line."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from twotower.cli import app
from twotower.errors import DataError
from twotower.export import export_run, read_ids, update_artifact
from twotower.serving import Artifact, Retriever
from twotower.training.run import load_model, train_run


@pytest.fixture(scope="module")
def exports(tmp_path_factory: pytest.TempPathFactory, tiny_demo) -> dict[str, Path]:
    """A tiny run; its export A; its item file then changed (items 0-4 retitled and
    repriced, two new items copying items 10 and 11 but for their ids) and exported
    again as B; the changed and new rows (and two unchanged ones) as a Parquet file."""
    folder = Path(tmp_path_factory.mktemp("update"))
    config = tiny_demo(folder / "data")
    train_run(config, folder / "run")
    export_run(folder / "run", folder / "A")
    path = load_model(folder / "run")[0].data.items.path
    items = pq.read_table(path)
    rows = items.to_pylist()
    for row in rows[:5]:
        row["title"], row["price"] = f"{row['title']} deluxe", row["price"] * 3
    new = [{**rows[10], "item_id": 5000}, {**rows[11], "item_id": 5001}]
    changed = pa.Table.from_pylist(rows + new, schema=items.schema)
    pq.write_table(changed, path)
    export_run(folder / "run", folder / "B")
    pq.write_table(
        pa.Table.from_pylist(rows[:7] + new, schema=items.schema), folder / "changes.parquet"
    )
    return {"run": folder / "run", "A": folder / "A", "B": folder / "B", "dir": folder}


@pytest.fixture
def updated(exports, tmp_path) -> tuple[Path, dict]:
    out = Path(shutil.copytree(exports["A"], tmp_path / "A"))
    return out, update_artifact(out, items=exports["dir"] / "changes.parquet")


def test_an_update_equals_a_full_export_of_the_same_data(exports, updated):
    out, done = updated
    assert done == {
        "version": 2,
        "written": True,
        "added": 2,
        "replaced": 5,
        "blocked": 0,
        "unblocked": 0,
        "removed": 0,
        "unchanged": 2,
    }
    mine, full = Artifact.load(out), Artifact.load(exports["B"])
    ids = full.item_id_values.tolist()
    rows = mine.item_rows(ids)
    assert (rows >= 0).all() and mine.catalogue.num_items == full.catalogue.num_items
    # every item's vector, the unchanged and the changed and the new alike
    np.testing.assert_allclose(mine.item_vectors[rows], full.item_vectors, rtol=0, atol=1e-6)
    assert mine.items.take(pa.array(rows)).equals(full.items)
    # and the answers: the exact index ranks the same items for every known user
    users = full.queries.column(full.query_key).to_pylist()
    ours, theirs = Retriever(mine).recall_users(users, 10), Retriever(full).recall_users(users, 10)
    for a, b in zip(ours, theirs, strict=True):
        assert a.items == b.items
        np.testing.assert_allclose(a.scores, b.scores, atol=1e-5)
    new_ones = {item for answer in ours for item in answer.items} & {5000, 5001}
    assert new_ones == {item for answer in theirs for item in answer.items} & {5000, 5001}


def test_only_the_changed_rows_are_written(exports, updated):
    out, _ = updated
    written = pq.read_table(out / "updates" / "000002" / "items.parquet")
    first = Artifact.load(out).item_id_values[:5].tolist()
    assert written.column("item_id").to_pylist() == [*first, 5000, 5001]
    assert np.load(out / "updates" / "000002" / "item_vectors.npy").shape == (7, 16)
    again = update_artifact(out, items=exports["dir"] / "changes.parquet")
    assert again["written"] is False and again["version"] == 2 and again["unchanged"] == 9


def test_the_command_line_updates_from_csv_and_id_files(exports, tmp_path):
    out = Path(shutil.copytree(exports["A"], tmp_path / "A"))
    rows = pq.read_table(exports["dir"] / "changes.parquet").slice(7)  # the two new items
    pacsv.write_csv(rows, tmp_path / "new.csv")
    (tmp_path / "block.txt").write_text("item_id\n5000\n\n3\n")
    pq.write_table(pa.table({"id": [7]}), tmp_path / "remove.parquet")
    command = ["export", "--update", str(out), "--items", str(tmp_path / "new.csv")]
    command += [
        "--block",
        str(tmp_path / "block.txt"),
        "--remove",
        str(tmp_path / "remove.parquet"),
    ]
    result = CliRunner().invoke(app, command)
    assert result.exit_code == 0, result.output
    assert f"Wrote version 2 of {out}: 2 added, 0 replaced, 2 blocked, 0 unblocked, 1 removed" in (
        result.output
    )
    artifact = Artifact.load(out)
    assert artifact.item_rows([5000, 5001, 7, 3]).tolist() == [100, 101, -1, 2]  # ids from 1
    assert artifact.catalogue.blocked[[100, 2]].all() and artifact.catalogue.removed[6]
    result = CliRunner().invoke(
        app, ["export", "--update", str(out), "--unblock", str(tmp_path / "block.txt")]
    )
    assert "Wrote version 3" in result.output and "2 unblocked" in result.output
    result = CliRunner().invoke(
        app, ["export", "--update", str(out), "--unblock", str(tmp_path / "block.txt")]
    )
    assert "Nothing changed" in result.output and "stays at version 3" in result.output


def test_the_command_line_refuses_mixed_or_bad_arguments(exports, tmp_path):
    out = Path(shutil.copytree(exports["A"], tmp_path / "A"))
    for command, message in [
        (["export", str(exports["run"]), "--update", str(out)], "give no RUN_DIR nor --out"),
        (["export", str(exports["run"]), "--out", str(out), "--block", "x"], "--block: only with"),
        (["export", "--out", str(out)], "give a RUN_DIR and --out"),
    ]:
        result = CliRunner().invoke(app, command)
        assert result.exit_code != 0 and message in str(result.exception), result.output
    bad = pa.table({"item_id": [1], "title": ["x"], "price": ["cheap"]})
    pacsv.write_csv(bad, tmp_path / "bad.csv")
    with pytest.raises(DataError, match=r"bad.csv, line 2, column 'price': cannot convert"):
        update_artifact(out, items=tmp_path / "bad.csv")
    pq.write_table(pa.table({"item_id": [1], "title": ["x"]}), tmp_path / "short.parquet")
    with pytest.raises(DataError, match=r"short.parquet, row 0 \(0-based\): lacks column"):
        update_artifact(out, items=tmp_path / "short.parquet")
    assert Artifact.load(out).version == 1


def test_id_files(tmp_path):
    (tmp_path / "ids.txt").write_text("item_id\n 12 \nabc\n\n")
    assert read_ids(tmp_path / "ids.txt", "item_id") == ["12", "abc"]
    (tmp_path / "plain.txt").write_text("12\n13\n")
    assert read_ids(tmp_path / "plain.txt", "item_id") == ["12", "13"]
    pq.write_table(pa.table({"item_id": [1, 2], "note": ["a", "b"]}), tmp_path / "two.parquet")
    assert read_ids(tmp_path / "two.parquet", "item_id") == [1, 2]
    pq.write_table(pa.table({"a": [1], "b": [2]}), tmp_path / "bad.parquet")
    with pytest.raises(DataError, match="no column 'item_id'"):
        read_ids(tmp_path / "bad.parquet", "item_id")
    with pytest.raises(DataError, match="file not found"):
        read_ids(tmp_path / "none.txt", "item_id")
