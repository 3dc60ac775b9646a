"""Vector features from a hand-made Parquet file to the service: a run whose items carry
an image embedding (a plain list column, one item without one) and whose users carry a
taste embedding (a fixed_size_list column, standardized and projected), exported with
its ONNX query tower. The artifact's item vectors are the model's, the ONNX tower
answers as PyTorch's on rows with the vector, a request carrying a vector (Retriever and
HTTP) is answered as the model ranks it, a bad vector is refused by row and column
alone, and ``export --update`` embeds new item rows with their vectors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from fastapi.testclient import TestClient

from twotower.config import Config
from twotower.data.config import DataConfig, FeatureTableConfig, InteractionsConfig, SplitConfig
from twotower.errors import DataError
from twotower.export import export_run, update_artifact
from twotower.features.specs import FeaturesConfig, IdFeature, VectorFeature
from twotower.serving import Artifact, Retriever
from twotower.serving.http import ServiceConfig, create_app
from twotower.serving.item_changes import ItemChange, prepare_update
from twotower.serving.query import Query
from twotower.sources import load_data
from twotower.towers.config import MLPConfig, ModelConfig
from twotower.towers.model import embed_inputs, embed_rows
from twotower.training.config import TrainingConfig
from twotower.training.run import load_model, train_run

pytest.importorskip("onnxruntime", reason="the onnx extra is not installed")
pytest.importorskip("onnxscript", reason="the onnx extra is not installed")

from twotower.serving.artifact import ONNX_FILE  # noqa: E402
from twotower.serving.runtime import OnnxRuntime  # noqa: E402

LOOPBACK = ("127.0.0.1", 50000)
USERS, ITEMS, CLUSTERS = 60, 40, 4
TASTE, IMAGE = 5, 6  # the vectors' widths


def vector_config(folder: Path) -> Config:
    """Users and items in four clusters: each user's interactions are items of its own
    cluster; an item's image embedding and a user's taste embedding are noisy copies of
    their cluster's centre. Item 7 has no image (``missing: zero``)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    item_cluster, user_cluster = np.arange(ITEMS) % CLUSTERS, np.arange(USERS) % CLUSTERS
    image = rng.normal(size=(CLUSTERS, IMAGE))[item_cluster] + 0.3 * rng.normal(size=(ITEMS, IMAGE))
    taste = rng.normal(size=(CLUSTERS, TASTE))[user_cluster] + 0.3 * rng.normal(size=(USERS, TASTE))
    items = [rng.choice(np.flatnonzero(item_cluster == c), 6, replace=False) for c in user_cluster]
    paths = {name: folder / f"{name}.parquet" for name in ("log", "users", "items")}
    log = {"q": np.repeat(np.arange(USERS), 6), "i": np.concatenate(items)}
    pq.write_table(pa.table({**log, "t": np.arange(USERS * 6)}), paths["log"])
    flat = pa.array(taste.astype(np.float32).ravel())
    users = {"q": np.arange(USERS), "taste": pa.FixedSizeListArray.from_arrays(flat, TASTE)}
    pq.write_table(pa.table(users), paths["users"])
    images = [None if i == 7 else row for i, row in enumerate(image.tolist())]
    pq.write_table(pa.table({"i": np.arange(ITEMS), "image": images}), paths["items"])
    return Config(
        data=DataConfig(
            source="files",
            interactions=InteractionsConfig(paths["log"], query_id="q", item_id="i", timestamp="t"),
            queries=FeatureTableConfig(paths["users"], key="q"),
            items=FeatureTableConfig(paths["items"], key="i"),
        ),
        split=SplitConfig(method="leave_last_out"),
        features=FeaturesConfig(
            query=[
                IdFeature("user", "q", dim=8),
                VectorFeature("taste", "taste", dim=TASTE, normalize="standardize", project=8),
            ],
            item=[
                IdFeature("item_id", "i", dim=8),
                VectorFeature("image", "image", dim=IMAGE, missing="zero"),
            ],
        ),
        model=ModelConfig(query=MLPConfig(widths=[16]), item=MLPConfig(widths=[16])),
        training=TrainingConfig(epochs=2, batch_size=32, tensorboard=False, ks=[10], device="cpu"),
    )


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(the artifact, exported with its ONNX query tower; the run folder)."""
    folder = Path(tmp_path_factory.mktemp("vectors"))
    train_run(vector_config(folder / "data"), folder / "run")
    export_run(folder / "run", folder / "artifact", onnx=True)
    return folder / "artifact", folder / "run"


def _new_users(count: int, seed: int = 1) -> pa.Table:
    """Rows of users the artifact does not know: unseen ids, taste vectors of their own."""
    taste = np.random.default_rng(seed).normal(size=(count, TASTE))
    return pa.table({"q": np.arange(-count, 0), "taste": taste.tolist()})


def _ranked(query: np.ndarray, items: np.ndarray, k: int) -> list[int]:
    """Item rows of the k best inner products, ties to the lower row."""
    scores = items.astype(np.float64) @ query.astype(np.float64)
    return np.lexsort((np.arange(len(scores)), -scores))[:k].tolist()


def test_the_artifacts_item_vectors_are_the_models(exported):
    folder, run = exported
    artifact = Artifact.load(folder)
    config, pipeline, model = load_model(run)
    dataset, _ = load_data(config)
    items = embed_rows(model.item_tower, pipeline, "item", dataset.items).numpy()
    np.testing.assert_array_equal(artifact.item_vectors, items)
    inputs = pipeline.transform("item", dataset.items)["image"]
    assert inputs.shape == (ITEMS, IMAGE) and not inputs[7].any()  # the missing image
    np.testing.assert_allclose(inputs.norm(dim=1)[:7], 1.0, rtol=1e-6)


def test_the_onnx_tower_answers_as_pytorchs_on_rows_with_the_vector(exported):
    folder, _ = exported
    artifact = Artifact.load(folder)
    contract = {spec["name"]: spec for spec in artifact.manifest["onnx"]["inputs"]}
    taste = contract["taste"]
    assert (taste["dtype"], taste["shape"], taste["column"]) == ("float32", ["batch", 5], "taste")
    rows = pa.concat_tables(
        [artifact.queries.slice(0, 9).cast(_new_users(1).schema), _new_users(23)]
    )
    inputs = artifact.pipeline.transform("query", rows)
    expected = embed_inputs(artifact.query_tower, [inputs]).numpy()
    runtime = OnnxRuntime(folder / ONNX_FILE, list(contract), (1, expected.shape[1]))
    got = runtime.vectors([inputs])
    assert got.shape == (32, expected.shape[1])
    assert np.abs(got - expected).max() <= 1e-5
    assert artifact.manifest["onnx"]["check"]["queries"] == USERS


@pytest.mark.parametrize("runtime", ["torch", "onnx"])
def test_a_request_carrying_a_vector_is_answered_as_the_model_ranks_it(exported, runtime):
    folder, run = exported
    retriever = Retriever.load(folder, runtime=runtime)
    _, pipeline, model = load_model(run)
    rows = _new_users(4)
    vectors = embed_rows(model.query_tower, pipeline, "query", rows).numpy()
    queries = [Query(features=row, k=10) for row in rows.to_pylist()]
    items = retriever.artifact.item_vectors
    ids = retriever.artifact.items.column("i").to_pylist()
    for vector, result in zip(vectors, retriever.retrieve(queries), strict=True):
        assert result.items == [ids[i] for i in _ranked(vector, items, 10)]


def test_over_http_a_bad_vector_is_refused_by_its_row_and_column_alone(exported):
    folder, _ = exported
    good = _new_users(1).to_pylist()[0]
    queries = [
        {"features": good, "k": 5},
        {"features": {"q": -2, "taste": [0.1, 0.2, 0.3]}, "k": 5},
        {"features": {"q": -3, "taste": [0.1, float("nan"), 0.3, 0.4, 0.5]}, "k": 5},
        {"features": {"q": -4}, "k": 5},
    ]
    expected = Retriever.load(folder).retrieve([Query(features=good, k=5)])[0]
    with TestClient(create_app(folder, ServiceConfig()), client=LOOPBACK) as client:
        alone = client.post("/recall", json=queries[0])
        body = json.dumps({"queries": queries})  # NaN as Python's json writes it
        headers = {"content-type": "application/json"}
        batch = client.post("/recall/batch", content=body, headers=headers).json()["results"]
    assert alone.status_code == 200 and alone.json()["items"] == expected.items
    assert [result["status"] for result in batch] == [200, 422, 422, 422]
    assert batch[0]["items"] == expected.items
    where = "vector feature 'taste' (column 'taste'): the vector"
    width = "feature 'taste': a list of 3 values, where the column holds lists of 5"
    assert batch[1]["error"].startswith(width)
    assert f"{where} holds a null, NaN or infinite number" in batch[2]["error"]
    assert f"{where} is missing (null)" in batch[3]["error"]


def test_export_update_embeds_new_item_rows_with_their_vectors(exported, tmp_path):
    folder, run = exported
    copy = Path(shutil.copytree(folder, tmp_path / "artifact"))
    image = np.random.default_rng(2).normal(size=(2, IMAGE))
    rows = pa.table({"i": [1000, 3], "image": image.tolist()})  # a new item, a changed one
    pq.write_table(rows, tmp_path / "changes.parquet")
    done = update_artifact(copy, items=tmp_path / "changes.parquet")
    assert (done["added"], done["replaced"]) == (1, 1)
    artifact = Artifact.load(copy)
    _, pipeline, model = load_model(run)
    expected = embed_rows(model.item_tower, pipeline, "item", rows).numpy()
    found = artifact.item_rows([1000, 3])
    np.testing.assert_allclose(artifact.item_vectors[found], expected, atol=1e-6)
    wrong = pa.table({"i": [1001, 1002], "image": [[0.5] * IMAGE, [0.5] * 4]})
    pq.write_table(wrong, tmp_path / "wrong.parquet")
    with pytest.raises(DataError, match=r"wrong.parquet: row 1 \(0-based\), column 'image'"):
        update_artifact(copy, items=tmp_path / "wrong.parquet")


def test_json_item_rows_are_checked_by_their_position(exported):
    folder, _ = exported
    artifact = Artifact.load(folder, users=False)
    rows = [{"i": 2000, "image": [0.5] * IMAGE}, {"i": 2001, "image": [1.0, float("inf")] * 3}]
    with pytest.raises(DataError) as err:
        prepare_update(artifact, ItemChange(rows=rows, source="the body"))
    assert str(err.value) == (
        "the body, row 1: vector feature 'image' (column 'image'): the vector "
        "holds a null, NaN or infinite number"
    )
    update = prepare_update(artifact, ItemChange(rows=rows[:1] + [{"i": 2002, "image": None}]))
    assert update.counts()["added"] == 2  # a missing image reads as zeros here


def test_a_warm_start_keeps_the_fitted_statistics(exported, tmp_path):
    """``--init-from`` the exported run, on data whose taste vectors moved: the new run
    (the projection's weights carried over) standardizes them with the earlier run's
    mean and std."""
    _, run = exported
    config = vector_config(tmp_path / "data")
    users = pq.read_table(config.data.queries.path)
    moved = np.stack(users.column("taste").to_numpy(zero_copy_only=False)) + 5.0
    pq.write_table(users.set_column(1, "taste", pa.array(moved.tolist())), config.data.queries.path)
    train_run(config, tmp_path / "warm", init_from=run)
    earlier, later = (load_model(folder)[1] for folder in (run, tmp_path / "warm"))
    kept = [p.transforms["query"]["taste"] for p in (earlier, later)]
    assert np.array_equal(kept[0].mean, kept[1].mean) and np.array_equal(kept[0].std, kept[1].std)
    assert np.abs(kept[1].mean - moved.mean(axis=0)).min() > 4  # not refitted on the new rows
