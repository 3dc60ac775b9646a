"""Precomputed query vectors: answers equal the tower's, each answer says which vector it
used, and a file that does not belong to the artifact is refused, saying why."""

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from fastapi.testclient import TestClient

from twotower.errors import DataError
from twotower.serving import Artifact, Retriever
from twotower.serving.http import ServiceConfig, create_app
from twotower.serving.query import Query
from twotower.serving.query_vectors import (
    ARTIFACT,
    VECTOR,
    read_query_vectors,
    write_query_vectors,
)

LOOPBACK = ("127.0.0.1", 50000)


@pytest.fixture(scope="module")
def vectors_file(demo_artifact, tmp_path_factory) -> Path:
    path = Path(tmp_path_factory.mktemp("vectors")) / "query_vectors.parquet"
    write_query_vectors(Artifact.load(demo_artifact[0]), path)
    return path


def test_the_file_holds_each_known_users_tower_vector(demo_artifact, vectors_file):
    folder, oracle = demo_artifact
    table = pq.read_table(vectors_file)
    artifact = Artifact.load(folder)
    assert table.column("user_id").to_pylist() == artifact.queries.column("user_id").to_pylist()
    assert pc.unique(pc.cast(table.column(ARTIFACT), pa.string())).to_pylist() == [
        artifact.fingerprint
    ]
    stored = np.stack(table.column(VECTOR).to_numpy(zero_copy_only=False))
    rows = [artifact.query_rows([key])[0] for key in oracle.query_ids]
    # the trained model's own vectors, computed from the same histories
    assert np.allclose(stored[rows], oracle.query_vectors, atol=1e-5)


def test_precomputed_answers_equal_the_towers(demo_artifact, vectors_file):
    folder, oracle = demo_artifact
    tower = Retriever.load(folder)
    stored = Retriever.load(folder, vectors_file)
    users = list(oracle.query_ids)
    for computed, precomputed in zip(
        tower.recall_users(users, 10), stored.recall_users(users, 10), strict=True
    ):
        assert computed.vector == "tower" and precomputed.vector == "precomputed"
        assert precomputed.items == computed.items
        assert np.allclose(precomputed.scores, computed.scores, atol=1e-5)
    # every user is in the file, yet a request may bring a history: the inputs are kept
    # for it (they would not be for a query side that reads no history)
    assert stored.artifact.pipeline.recent_length > 0 and stored.known_inputs is not None
    item = oracle.item_ids[3]
    queries = [Query(user=u, history=[item], k=10) for u in users[:20]]
    for computed, with_history in zip(
        tower.retrieve(queries), stored.retrieve(queries), strict=True
    ):
        assert with_history.vector == "tower" and with_history.items == computed.items
        assert with_history.state == {"features": "stored", "history": "request"}


def test_users_the_file_lacks_are_answered_by_the_tower(demo_artifact, vectors_file, tmp_path):
    folder, oracle = demo_artifact
    table = pq.read_table(vectors_file)
    half = table.take(pa.array(range(0, table.num_rows, 2)))  # every other user
    pq.write_table(half, tmp_path / "half.parquet")
    retriever = Retriever.load(folder, tmp_path / "half.parquet")
    assert retriever.known_inputs is not None  # the others still need theirs
    held = set(half.column("user_id").to_pylist())
    users = list(oracle.query_ids[:40])
    assert any(u in held for u in users) and any(u not in held for u in users)
    expected = Retriever.load(folder).recall_users(users, 10)
    for user, got, want in zip(users, retriever.recall_users(users, 10), expected, strict=True):
        assert got.vector == ("precomputed" if user in held else "tower")
        assert got.items == want.items


def _rewritten(table: pa.Table, path: Path, column: str, values) -> Path:
    out = path / f"bad-{column}-{len(list(path.iterdir()))}.parquet"
    pq.write_table(table.set_column(table.column_names.index(column), column, values), out)
    return out


def test_a_file_not_of_this_artifact_is_refused_saying_why(demo_artifact, vectors_file, tmp_path):
    artifact = Artifact.load(demo_artifact[0])
    table = pq.read_table(vectors_file)
    n = table.num_rows
    keys = table.column("user_id").to_pylist()
    vectors = table.column(VECTOR).combine_chunks()
    narrow = pa.FixedSizeListArray.from_arrays(
        pc.list_flatten(vectors).slice(0, n * 3), 3
    )  # three values per user
    nan = np.stack(vectors.to_numpy(zero_copy_only=False)).astype(np.float32)
    nan[5, 0] = np.nan
    cases = {
        "another artifact's": (
            _rewritten(table, tmp_path, ARTIFACT, pa.array(["0" * 16] * n)),
            "vectors of artifact '0000000000000000'",
        ),
        "width": (_rewritten(table, tmp_path, VECTOR, narrow), "not fixed-size lists of"),
        "unknown key": (
            _rewritten(table, tmp_path, "user_id", pa.array([-1, *keys[1:]])),
            "1 key(s) the artifact does not know (first: -1)",
        ),
        "twice": (
            _rewritten(table, tmp_path, "user_id", pa.array([keys[1], *keys[1:]])),
            f"query {keys[1]!r} has more than one row",
        ),
        "not finite": (
            _rewritten(
                table,
                tmp_path,
                VECTOR,
                pa.FixedSizeListArray.from_arrays(pa.array(nan.ravel()), nan.shape[1]),
            ),
            f"query {keys[5]!r} has a vector that is not",
        ),
    }
    pq.write_table(table.drop_columns([ARTIFACT]), tmp_path / "no-artifact.parquet")
    cases["column"] = (tmp_path / "no-artifact.parquet", "lacks column(s) 'artifact'")
    (tmp_path / "broken.parquet").write_bytes(b"not parquet")
    cases["unreadable"] = (tmp_path / "broken.parquet", "not a readable Parquet file")
    for name, (path, message) in cases.items():
        with pytest.raises(DataError) as caught:
            read_query_vectors(path, artifact)
        assert str(caught.value).startswith(f"{path}: ") and message in str(caught.value), name


def test_the_service_says_which_vector_answered(demo_artifact, vectors_file):
    folder, oracle = demo_artifact
    user = oracle.query_ids[3]
    expected = Retriever.load(folder).recall_users([user], 8)[0]
    config = ServiceConfig(query_vectors=vectors_file)
    with TestClient(create_app(folder, config), client=LOOPBACK) as client:
        known = client.post("/recall", json={"user_id": user, "k": 8}).json()
        cold = client.post("/recall", json={"features": {"segment": "b"}, "k": 8}).json()
        item = client.get(f"/items/{expected.items[0]}/similar", params={"k": 3}).json()
        batch = client.post("/recall/batch", json={"queries": [{"user_id": user, "k": 8}]})
        reload = client.post("/admin/reload")  # the file is read again, and still fits
        again = client.post("/recall", json={"user_id": user, "k": 8}).json()
    assert known["vector"] == "precomputed" and known["items"] == expected.items
    assert cold["vector"] == "tower" and item["vector"] == "item"
    assert batch.json()["results"][0]["vector"] == "precomputed"
    assert reload.status_code == 200 and again["vector"] == "precomputed"


def test_a_file_of_another_artifact_stops_the_service_from_starting(
    demo_artifact, vectors_file, tmp_path
):
    table = pq.read_table(vectors_file)
    other = _rewritten(table, tmp_path, ARTIFACT, pa.array(["f" * 16] * table.num_rows))
    with pytest.raises(DataError, match="vectors of artifact 'ffffffffffffffff'"):
        create_app(demo_artifact[0], ServiceConfig(query_vectors=other))
