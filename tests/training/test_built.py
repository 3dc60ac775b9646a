"""Training from ``twotower data build``'s output through the stream: the same histories
the in-memory path makes, for training rows and for the evaluation inputs of each
part, and a run that learns."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from twotower.config import Config
from twotower.data.build.format import FEATURES_DIR, built_stream
from twotower.data.config import DataConfig, StreamConfig
from twotower.features.pipeline import FeaturePipeline
from twotower.features.specs import FeaturesConfig, HistoryFeature, IdFeature
from twotower.features.streaming import load_fitted, read_items
from twotower.prepare import build_data
from twotower.sources import load_data
from twotower.training.examples import StreamingTrainingData, TrainingData
from twotower.training.run import train_run

pytest.importorskip("duckdb")

FEATURES = FeaturesConfig(
    query=[HistoryFeature("history", "user_id", "item_id", max_len=8)],
    item=[IdFeature("item_id", "item_id", dim=32)],
)


@pytest.fixture(scope="module")
def configs(small_config, tmp_path_factory) -> tuple[Config, Config]:
    """The in-memory config (interactions and items files, no user table) and the
    stream config reading its build."""
    memory_data = dataclasses.replace(small_config.data, queries=None)
    memory = dataclasses.replace(small_config, data=memory_data, features=FEATURES)
    built = tmp_path_factory.mktemp("built") / "out"
    build_data(memory, built)
    stream = StreamConfig(built=built, workers=0)
    streamed = dataclasses.replace(
        memory, data=DataConfig(source="stream", stream=stream), features=FEATURES
    )
    return memory, streamed


def _ids(codes: torch.Tensor, pipeline: FeaturePipeline, items) -> list[list]:
    """Item-index rows as lists of item ids (0 and padding dropped)."""
    lookup = pipeline.transforms["item"]["item_id"].transform(items.column("item_id"))
    to_id = {int(c): i for c, i in zip(lookup, items.column("item_id").to_pylist(), strict=True)}
    return [[to_id[c] for c in row if c] for row in codes.tolist()]


def test_built_rows_give_the_in_memory_histories(configs):
    memory, streamed = configs
    dataset, split = load_data(memory)
    pipeline = FeaturePipeline.fit(memory.features, dataset, split.train)
    data = TrainingData(dataset, split, pipeline)
    expected = _ids(data.batch(torch.arange(len(data))).query["history"], pipeline, dataset.items)

    config = built_stream(streamed.data.stream)
    stream_pipeline, counts, _ = load_fitted(streamed.data.stream.built / FEATURES_DIR)
    items = read_items(config, FEATURES)
    stream = StreamingTrainingData(config, stream_pipeline, items, counts)
    rows = [table for table in stream.stream.read(stream.stream.share(None, 0, 1))]
    got = [
        row
        for table in rows
        for row in _ids(
            stream_pipeline.transform("query", table)["history"], stream_pipeline, items
        )
    ]
    assert got == expected  # the build writes training rows in source order
    # the evaluation inputs: each query's history as of validation and of test
    keys = dataset.queries.column(dataset.query_key).to_pylist()
    position = {key: row for row, key in enumerate(keys)}
    for part in ("valid", "test"):
        queries = sorted(set(getattr(stream.split, part).column("query_idx").to_pylist()))
        stream_ids = _ids(
            stream.query_inputs(torch.tensor(queries), part)["history"], stream_pipeline, items
        )
        rows = torch.tensor([position[key] for key in _eval_keys(config, queries)])
        memory_ids = _ids(data.query_inputs(rows, part)["history"], pipeline, dataset.items)
        assert stream_ids == memory_ids, part


def _eval_keys(config: StreamConfig, queries: list[int]) -> list:
    """The query keys of the stream's evaluation rows ``queries``: the distinct query
    ids of the validation then test rows, in order of first appearance."""
    import pyarrow.parquet as pq

    ids = []
    for path in (config.valid, config.test):
        ids += pq.read_table(path, columns=[config.query_id])[config.query_id].to_pylist()
    keys = list(dict.fromkeys(ids))
    return [keys[q] for q in queries]


@pytest.fixture(scope="module")
def streamed_run(configs, tmp_path_factory):
    _, streamed = configs
    return train_run(streamed, tmp_path_factory.mktemp("runs") / "stream")


def test_a_run_on_built_data_learns(streamed_run, popularity_recall):
    recall = streamed_run.metrics["valid/recall@10"]
    # the same interactions and split as small_config's, so the same popularity ranking
    assert recall > 1.5 * popularity_recall, (recall, popularity_recall)


def test_evaluate_ranks_every_built_query_as_in_memory(configs, streamed_run):
    """``twotower evaluate`` of a run on built data ranks each query of the build, with
    its history as of the part, exactly as the in-memory evaluation ranks the same
    model on the in-memory split (every metric, every cutoff, popularity included)."""
    from twotower.training.evaluate import evaluate_model
    from twotower.training.run import evaluate_run, load_model

    memory, _ = configs
    got = evaluate_run(streamed_run.out, ks=[1, 5, 10, 50])
    _, built_pipeline, model = load_model(streamed_run.out)
    dataset, split = load_data(memory)
    pipeline = FeaturePipeline.fit(memory.features, dataset, split.train)
    assert pipeline.to_bytes()[1] != b""  # the in-memory fit holds the histories
    data = TrainingData(dataset, split, pipeline, memory.training.history)
    expected = {}
    for part in ("valid", "test"):
        expected.update(evaluate_model(model, data, part, [1, 5, 10, 50]))
    assert got.keys() == expected.keys()
    assert got["test/queries"] == expected["test/queries"] > 0
    for name, value in expected.items():
        assert got[name] == pytest.approx(value, rel=1e-9, abs=1e-12), name


def test_the_build_fits_the_features_as_in_memory(tmp_path):
    """Every kind of feature of the demo (ids, one-hot, multi-hot, text, standardized,
    log and bucketized values, on both sides, a user table and an item table): the
    build's fitted state is the in-memory fit's, and so are the item counts."""
    import numpy as np

    from twotower.demo import _write_synthetic, demo_config
    from twotower.features.history import HistoryTransform

    config = demo_config(["data.synthetic.num_queries=300", "data.synthetic.num_items=150"])
    config = dataclasses.replace(config, data=_write_synthetic(config, tmp_path / "data"))
    build_data(config, tmp_path / "built")
    built, counts, exact = load_fitted(tmp_path / "built" / FEATURES_DIR)
    dataset, split = load_data(config)
    memory = FeaturePipeline.fit(config.features, dataset, split.train)
    assert all(exact.values())
    np.testing.assert_array_equal(
        counts, np.bincount(split.train["item_idx"].to_numpy(), minlength=dataset.num_items)
    )
    compared = 0
    for side in ("query", "item"):
        for name, transform in memory.transforms[side].items():
            if isinstance(transform, HistoryTransform):  # built rows carry their histories
                continue
            scalars, arrays = transform.state()
            got_scalars, got_arrays = built.transforms[side][name].state()
            assert got_scalars.keys() == scalars.keys(), name
            for key, value in scalars.items():
                assert got_scalars[key] == pytest.approx(value, rel=1e-12), (name, key)
            assert got_arrays.keys() == arrays.keys(), name
            for key, value in arrays.items():
                if value.dtype.kind == "f":
                    np.testing.assert_allclose(got_arrays[key], value, rtol=1e-12, err_msg=name)
                else:
                    np.testing.assert_array_equal(got_arrays[key], value, err_msg=name)
            compared += 1
    assert compared == 10


def test_a_build_for_other_features_is_refused(configs, tmp_path):
    from twotower.errors import ConfigError

    _, streamed = configs
    other = FeaturesConfig(query=FEATURES.query, item=[IdFeature("item_id", "item_id", dim=16)])
    with pytest.raises(ConfigError, match=r"built for other features than this config's"):
        train_run(dataclasses.replace(streamed, features=other), tmp_path / "run")


def test_a_built_stream_names_no_files_of_its_own(tmp_path):
    with pytest.raises(ValueError, match=r"built stands for train, items: drop them"):
        StreamConfig(built=tmp_path, train=tmp_path, items=tmp_path)
    with pytest.raises(ValueError, match=r"data.stream needs valid, test \(or built"):
        StreamConfig(train=tmp_path, items=tmp_path)


def test_an_artifact_exported_from_built_data_serves_as_in_memory(configs, streamed_run, tmp_path):
    """Exported from a run on built data, the artifact answers each known user with
    every logged interaction as history and seen items excluded: the exact top 10 that
    the same model gives in memory. A request may bring the history itself."""
    import numpy as np

    from twotower.data.matrix import interaction_matrix
    from twotower.export import export_run
    from twotower.index.topk import top_k
    from twotower.serving.query import Query
    from twotower.serving.retriever import Retriever
    from twotower.towers.model import embed_rows
    from twotower.training.run import load_model

    memory, _ = configs
    export_run(streamed_run.out, tmp_path / "artifact")
    retriever = Retriever.load(tmp_path / "artifact")
    _, _, model = load_model(streamed_run.out)
    dataset, split = load_data(memory)
    served = FeaturePipeline.fit(memory.features, dataset, split.train)
    served = served.with_histories(dataset, dataset.interactions)
    queries = embed_rows(model.query_tower, served, "query", dataset.queries)
    items = embed_rows(model.item_tower, served, "item", dataset.items)
    seen = interaction_matrix(dataset.interactions, dataset.num_queries, dataset.num_items)
    users = np.arange(dataset.num_queries)
    ranked, _ = top_k(lambda rows: queries[rows] @ items.T, users, 10, seen)
    item_ids = np.array(dataset.items.column(dataset.item_key).to_pylist())
    user_ids = dataset.queries.column(dataset.query_key).to_pylist()
    answers = retriever.recall_users(user_ids, 10)
    assert [a.items for a in answers] == [item_ids[row].tolist() for row in ranked]
    # a request carrying that user's history (oldest first): the known user's answer
    (recent,) = retriever.store.read([user_ids[0]]).recent
    history = [item for item, _ in reversed(recent)]
    cold = retriever.retrieve([Query(history=history, k=10, exclude_seen=False)])
    known = retriever.recall_users([user_ids[0]], 10, exclude_seen=False)
    assert cold[0].items == known[0].items
    empty = retriever.retrieve([Query(features={}, k=10)])  # no history: an empty one
    assert len(empty[0].items) == 10


def test_evaluate_can_rank_a_seeded_sample_of_the_built_queries(streamed_run):
    from twotower.training.run import evaluate_run

    full = evaluate_run(streamed_run.out, ("test",), [10])
    every = evaluate_run(streamed_run.out, ("test",), [10], sample=10**6)
    assert every == full
    sampled = evaluate_run(streamed_run.out, ("test",), [10], sample=100)
    assert sampled == evaluate_run(streamed_run.out, ("test",), [10], sample=100)
    assert 50 < sampled["test/queries"] < 150 < full["test/queries"]


def test_the_build_fits_movielens_100k_features_as_in_memory(tmp_path):
    """MovieLens-100K's own tables ('|'-separated, latin-1 titles): the user key, age,
    gender, occupation and zip code, the item key and title text fitted by the build
    equal the in-memory fit, and so do the item counts."""
    import numpy as np

    from twotower.config import load_config
    from twotower.features.history import HistoryTransform

    folder = Path(__file__).resolve().parents[3] / "shared" / "datasets" / "ml-100k"
    if not folder.is_dir():
        pytest.skip(f"MovieLens-100K not found at {folder}")
    genres = [f"g{i}" for i in range(19)]
    (tmp_path / "config.yaml").write_text(
        f"""
data:
  source: files
  interactions: {{path: {folder}/u.data, delimiter: "\\t", header: false,
    columns: [user, item, rating, ts], query_id: user, item_id: item, timestamp: ts}}
  queries: {{path: {folder}/u.user, delimiter: "|", header: false,
    columns: [user, age, gender, occupation, zip], key: user}}
  items: {{path: {folder}/u.item, delimiter: "|", header: false, encoding: latin-1,
    quote_char: null, columns: [item, title, released, video, url, {", ".join(genres)}],
    key: item}}
split: {{method: leave_last_out}}
features:
  query:
    - {{name: user, kind: id, column: user, dim: 8}}
    - {{name: age, kind: dense, column: age, transform: bucketize, num_buckets: 6}}
    - {{name: gender, kind: onehot, column: gender}}
    - {{name: occupation, kind: id, column: occupation, dim: 4}}
    - {{name: zip, kind: id, column: zip, dim: 4, min_count: 2}}
    - {{name: history, kind: history, column: user, item_feature: item, max_len: 20}}
  item:
    - {{name: item, kind: id, column: item, dim: 8}}
    - {{name: title, kind: text, column: title, buckets: 512}}
"""
    )
    config = load_config(tmp_path / "config.yaml")
    build_data(config, tmp_path / "built")
    built, counts, _ = load_fitted(tmp_path / "built" / FEATURES_DIR)
    dataset, split = load_data(config)
    memory = FeaturePipeline.fit(config.features, dataset, split.train)
    np.testing.assert_array_equal(
        counts, np.bincount(split.train["item_idx"].to_numpy(), minlength=dataset.num_items)
    )
    for side in ("query", "item"):
        for name, transform in memory.transforms[side].items():
            if isinstance(transform, HistoryTransform):
                continue
            scalars, arrays = transform.state()
            assert built.transforms[side][name].state()[0] == pytest.approx(scalars), name
            got = built.transforms[side][name].state()[1]
            assert got.keys() == arrays.keys(), name
            for key, value in arrays.items():
                np.testing.assert_array_equal(got[key], value, err_msg=f"{name}.{key}")


def test_an_as_of_valid_artifact_from_built_data_answers_the_evaluated_rankings(
    configs, streamed_run, tmp_path, served_metrics
):
    """Exported from the build as of the end of validation (its queries_test rows),
    the artifact's answers to the test users give ``twotower evaluate``'s test metrics
    of the run, which rank the build's queries."""
    from twotower.export import export_run
    from twotower.training.run import evaluate_run

    memory, _ = configs
    dataset, split = load_data(memory)
    export_run(streamed_run.out, tmp_path / "valid", as_of="valid")
    expected = evaluate_run(streamed_run.out, ("test",), [1, 5, 10])
    got = served_metrics(tmp_path / "valid", split, dataset, [split.train, split.valid], [1, 5, 10])
    for name, value in got.items():
        assert value == pytest.approx(expected[name], abs=1e-12), name
