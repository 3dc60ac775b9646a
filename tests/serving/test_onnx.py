"""The ONNX query tower: its vectors equal PyTorch's (1,000 users of an exported artifact,
and every encoder and network on full, cut, single and empty batches), its inputs are
the ones its contract names, and the service runs it, answering as with PyTorch."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch
from fastapi.testclient import TestClient
from typer.testing import CliRunner

pytest.importorskip("onnxruntime", reason="the onnx extra is not installed")
pytest.importorskip("onnxscript", reason="the onnx extra is not installed")

from twotower.cli import app  # noqa: E402
from twotower.errors import ConfigError, DataError  # noqa: E402
from twotower.export import ONNX_TOLERANCE, write_onnx  # noqa: E402
from twotower.features.contract import input_contract  # noqa: E402
from twotower.serving import Artifact, Retriever  # noqa: E402
from twotower.serving.artifact import ONNX_FILE  # noqa: E402
from twotower.serving.http import ServiceConfig, create_app  # noqa: E402
from twotower.serving.runtime import OnnxRuntime  # noqa: E402
from twotower.towers.config import DCNConfig  # noqa: E402
from twotower.towers.model import build_query_tower, embed_inputs  # noqa: E402
from twotower.training.run import train_run  # noqa: E402

LOOPBACK = ("127.0.0.1", 50000)
USERS = 1000


@pytest.fixture(scope="module")
def thousand_users(tmp_path_factory, tiny_demo) -> Path:
    """An artifact of 1,000 known users, exported with ``twotower export --onnx``."""
    folder = Path(tmp_path_factory.mktemp("onnx"))
    users, items = f"data.synthetic.num_queries={USERS}", "data.synthetic.num_items=300"
    train_run(tiny_demo(folder / "data", users, items), folder / "run")
    result = CliRunner().invoke(
        app, ["export", str(folder / "run"), "--out", str(folder / "artifact"), "--onnx"]
    )
    assert result.exit_code == 0, result.output
    assert "ONNX query tower" in result.output
    return folder / "artifact"


def test_onnx_vectors_equal_pytorchs_for_1000_users(thousand_users):
    artifact = Artifact.load(thousand_users)
    check = artifact.manifest["onnx"]["check"]
    assert check["queries"] == USERS and check["max_abs_diff"] <= ONNX_TOLERANCE
    inputs = artifact.pipeline.transform("query", artifact.queries)
    expected = embed_inputs(artifact.query_tower, [inputs]).numpy()
    names = [spec["name"] for spec in artifact.manifest["onnx"]["inputs"]]
    got = OnnxRuntime(thousand_users / ONNX_FILE, names, (1, expected.shape[1])).vectors([inputs])
    assert got.shape == expected.shape == (USERS, expected.shape[1])
    assert np.abs(got - expected).max() <= 1e-5


def test_onnx_answers_equal_pytorchs(thousand_users):
    torch_side = Retriever.load(thousand_users, runtime="torch")
    onnx_side = Retriever.load(thousand_users, runtime="onnx")
    assert onnx_side.runtime.name == "onnx"
    assert torch_side.runtime.name == "torch" == Retriever.load(thousand_users).runtime.name
    users = torch_side.query_id_values.tolist()
    for a, b in zip(
        torch_side.recall_users(users, 10), onnx_side.recall_users(users, 10), strict=True
    ):
        assert a.items == b.items
        assert np.allclose(a.scores, b.scores, atol=1e-5)
    known = torch_side.artifact.queries.slice(4, 2)  # as new users: unseen ids, no history
    new = known.set_column(0, "user_id", pa.array([-1, -2], pa.int64()))
    for a, b in zip(torch_side.recall_rows(new, 10), onnx_side.recall_rows(new, 10), strict=True):
        assert a.items == b.items and np.allclose(a.scores, b.scores, atol=1e-5)


def test_the_contract_names_each_input_its_dtype_and_shape(thousand_users):
    artifact = Artifact.load(thousand_users)
    contract = artifact.manifest["onnx"]["inputs"]
    assert contract == input_contract(artifact.pipeline, "query")
    inputs = artifact.pipeline.transform("query", artifact.queries.slice(0, 5))
    assert [spec["name"] for spec in contract] == list(inputs)
    for spec in contract:
        values = inputs[spec["name"]]
        assert str(values.numpy().dtype) == spec["dtype"], spec
        assert len(spec["shape"]) == values.dim() and spec["shape"][0] == "batch"
        for size, actual in zip(spec["shape"][1:], values.shape[1:], strict=True):
            assert size == actual or isinstance(size, str), spec
        assert spec["column"] in artifact.queries.column_names and spec["encoding"]
    names = {spec["name"]: spec for spec in contract}
    assert names["history"]["shape"] == ["batch", "history_length"]
    assert names["age"]["shape"] == ["batch", 2]  # [standardized value, missing flag]
    import onnx

    graph = onnx.load(str(thousand_users / ONNX_FILE)).graph
    assert [i.name for i in graph.input] == list(names)
    assert [o.name for o in graph.output] == ["vectors"]


def _variants(request) -> tuple:
    """(tower, pipeline, queries) of one encoder or network: a trained artifact's, or
    random weights on the demo artifact's fitted features."""
    kind = request.param
    fixtures = {
        "transformer": "sequence_artifact",
        "attention-time-gaps": "timed_artifact",
        "self-attentive-interests": "interests_artifact",
        "mean": "demo_artifact",
        "item-bias": "item_bias_artifact",
    }
    if kind in fixtures:
        artifact = Artifact.load(request.getfixturevalue(fixtures[kind])[0])
        return artifact.query_tower, artifact.pipeline, artifact.queries
    if kind == "text":
        artifact = Artifact.load(request.getfixturevalue("text_artifact")[0])
        return artifact.query_tower, artifact.pipeline, artifact.queries
    artifact = Artifact.load(request.getfixturevalue("demo_artifact")[0])
    features, model = artifact.pipeline.config, artifact.model_config
    history = next(spec for spec in features.query if spec.name == "history")
    if kind == "gru":
        history = dataclasses.replace(history, encoder="gru")
    elif kind == "routing-interests":
        history = dataclasses.replace(history, interests=3, extractor="routing")
    elif kind == "dcn":
        network = DCNConfig(cross_layers=2, low_rank=4, widths=[16], dim=16)
        model = dataclasses.replace(model, query=network)
    query = [history if spec.name == "history" else spec for spec in features.query]
    features = dataclasses.replace(features, query=query)
    torch.manual_seed(0)
    tower = build_query_tower(model, features, artifact.pipeline).eval()
    return tower, artifact.pipeline, artifact.queries


@pytest.fixture(
    params=[
        "mean",
        "attention-time-gaps",
        "transformer",
        "gru",
        "self-attentive-interests",
        "routing-interests",
        "dcn",
        "text",
        "item-bias",
    ]
)
def variant(request):
    return _variants(request)


def test_every_encoder_and_network_exports_equal_to_pytorch(variant, tmp_path):
    tower, pipeline, queries = variant
    entry = write_onnx(tower, pipeline, queries, tmp_path)
    assert entry["check"]["max_abs_diff"] <= ONNX_TOLERANCE
    names = [spec["name"] for spec in entry["inputs"]]
    runtime = OnnxRuntime(tmp_path / ONNX_FILE, names, (tower.interests, tower.output_dim))
    inputs = pipeline.transform("query", queries)
    cut = {  # lists cut to 3 columns: another length than the graph was captured with
        name: values[:, :3] if spec["shape"][1:2] and isinstance(spec["shape"][1], str) else values
        for (name, values), spec in zip(inputs.items(), entry["inputs"], strict=True)
    }
    empty = {  # every list empty: cold-start rows
        name: torch.zeros_like(values[:4, :0]) if values is not cut[name] else values[:4]
        for name, values in cut.items()
    }
    for batch in (inputs, cut, {name: v[:1] for name, v in inputs.items()}, empty):
        expected = embed_inputs(tower, [batch]).numpy()
        got = runtime.vectors([batch])
        assert got.shape == expected.shape
        assert np.abs(got - expected).max() <= 1e-5


def test_the_onnx_runtime_serves_over_http(thousand_users):
    user = Artifact.load(thousand_users).queries.column("user_id")[0].as_py()
    answers = {}
    for runtime in ("torch", "onnx"):
        config = ServiceConfig(runtime=runtime)
        with TestClient(create_app(thousand_users, config), client=LOOPBACK) as client:
            response = client.post("/recall", json={"user_id": user, "k": 10})
            assert response.status_code == 200, response.text
            answers[runtime] = response.json()
            metrics = client.get("/metrics").text
            assert f'index="exact",runtime="{runtime}"' in metrics
    assert answers["onnx"]["items"] == answers["torch"]["items"]
    assert np.allclose(answers["onnx"]["scores"], answers["torch"]["scores"], atol=1e-5)


def test_an_artifact_without_the_graph_is_refused_by_the_onnx_runtime(demo_artifact):
    folder = demo_artifact[0]
    with pytest.raises(DataError, match=r"no ONNX query tower; export it with .*--onnx"):
        Retriever.load(folder, runtime="onnx")
    with pytest.raises(ConfigError, match="unknown tower runtime 'tensorrt'"):
        Retriever.load(folder, runtime="tensorrt")
