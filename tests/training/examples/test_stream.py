"""Training from a Parquet stream: every example once per epoch across ranks and
workers, the same run resumed, and clear errors for bad stream data."""

import dataclasses
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from twotower.config import load_config
from twotower.data.synthetic_stream import StreamSynthConfig, write_synthetic_stream
from twotower.errors import ConfigError, DataError
from twotower.features.streaming import fit_stream_pipeline
from twotower.sources import load_data
from twotower.training.distributed import Collective
from twotower.training.examples import StreamingTrainingData
from twotower.training.run import train_run

CONFIG = """
data:
  source: stream
  stream:
    train: train
    valid: valid.parquet
    test: test.parquet
    items: items.parquet
    buffer_rows: 3000
    workers: 0
features:
  query:
    - {name: user_id, kind: id, column: user_id, hash_buckets: 4096, hash_functions: 2}
    - {name: segment, kind: onehot, column: segment}
    - {name: age, kind: dense, column: age}
    - {name: sessions, kind: dense, column: sessions, transform: bucketize}
  item:
    - {name: item_id, kind: id, column: item_id}
    - {name: genres, kind: multihot, column: genres}
    - {name: title, kind: text, column: title, buckets: 512}
model:
  query: {kind: mlp, widths: [64, 32]}
  item: {kind: mlp, widths: [64, 32]}
training:
  objective: {kind: in_batch}
  epochs: 2
  batch_size: 256
  patience: 0
  tensorboard: false
  metric: valid/recall@10
  ks: [10, 50]
"""


@pytest.fixture(scope="module")
def stream_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("stream")
    synth = StreamSynthConfig(interactions=12_000, num_items=600, per_user=20, num_clusters=8)
    write_synthetic_stream(synth, folder)
    (folder / "config.yaml").write_text(CONFIG)
    return folder


def _data(stream_dir: Path, *overrides: str) -> StreamingTrainingData:
    config = load_config(stream_dir / "config.yaml", list(overrides))
    pipeline, items, counts, _ = fit_stream_pipeline(config.data.stream, config.features)
    return StreamingTrainingData(config.data.stream, pipeline, items, counts)


def test_an_epoch_over_ranks_and_workers_holds_each_training_row_once(stream_dir):
    data = _data(stream_dir, "data.stream.workers=2")
    train = pq.read_table(stream_dir / "train")
    expected = data.item_keys.find(train.column("item_id"))
    steps, positives = [], []
    for rank in range(2):
        generator = torch.Generator().manual_seed(11)  # the same on every rank
        batches = list(data.batches(256, generator, Collective(rank=rank, world_size=2)))
        steps.append(len(batches))
        positives += [b.positives for b in batches]
    assert steps[0] == steps[1]  # ranks take the same number of steps
    got = torch.cat(positives).numpy()
    assert np.array_equal(np.sort(got), np.sort(expected))
    # the query features travel with their rows: hashed user ids match the table's
    assert len(train) == len(got) == data.stream.num_rows


def test_item_counts_and_held_out_queries_come_from_the_files(stream_dir):
    data = _data(stream_dir)
    train = pq.read_table(stream_dir / "train")
    expected = np.bincount(data.item_keys.find(train.column("item_id")), minlength=600)
    assert np.array_equal(data.item_counts(), expected)
    valid = pq.read_table(stream_dir / "valid.parquet")
    assert data.split.valid.num_rows == valid.num_rows
    # the evaluation queries' training items are there to be excluded
    users = np.unique(valid.column("user_id").to_numpy())
    assert data.split.train.num_rows == int(np.isin(train.column("user_id"), users).sum())


def test_a_sample_of_evaluation_queries_keeps_exactly_their_rows(stream_dir):
    data = _data(stream_dir, "data.stream.eval_queries=50")
    tables = {n: pq.read_table(stream_dir / f"{n}.parquet") for n in ("valid", "test")}
    tables["train"] = pq.read_table(stream_dir / "train")
    # the sample: 50 of the held-out queries in order of appearance, seeded (seed 0)
    ids = np.concatenate([tables[n].column("user_id").to_numpy() for n in ("valid", "test")])
    _, first = np.unique(ids, return_index=True)
    every = ids[np.sort(first)]
    keys = every[np.sort(np.random.default_rng(0).choice(len(every), 50, replace=False))]
    assert data.num_queries == 50
    for name in ("valid", "test", "train"):
        users = tables[name].column("user_id").to_numpy()
        part = getattr(data.split, name)
        assert part.num_rows == int(np.isin(users, keys).sum()) > 0
        # each row's query index is its user's place among the sampled keys
        place = {int(key): i for i, key in enumerate(keys)}
        expected = np.array([place[int(u)] for u in users if int(u) in place])
        assert np.array_equal(np.sort(part.column("query_idx").to_numpy()), np.sort(expected))


def test_a_streamed_run_learns_and_resumes_exactly(stream_dir, tmp_path):
    config = load_config(stream_dir / "config.yaml")
    whole = train_run(config, tmp_path / "whole")
    recall = whole.metrics["test/recall@50"]
    assert recall > 3 * 50 / 600  # well above random ranking
    short = load_config(stream_dir / "config.yaml", ["training.epochs=1"])
    train_run(short, tmp_path / "parts")
    resumed = train_run(config, tmp_path / "parts", resume=True)
    assert resumed.metrics == whole.metrics
    fits = json.loads((tmp_path / "parts" / "features" / "fit.json").read_text())
    assert fits == {"user_id": "exact", "segment": "exact", "age": "exact", "sessions": "exact"}


def test_unknown_items_name_the_file_and_row_group(stream_dir, tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    for name in ("valid.parquet", "test.parquet", "items.parquet", "config.yaml"):
        (bad / name).write_bytes((stream_dir / name).read_bytes())
    (bad / "train").mkdir()
    rows = pq.read_table(stream_dir / "train").slice(0, 500)
    item = rows.column("item_id").to_numpy().copy()
    item[123] = 999_999
    rows = rows.set_column(rows.schema.get_field_index("item_id"), "item_id", pa.array(item))
    pq.write_table(rows, bad / "train" / "part-7.parquet", row_group_size=200)
    data = _data(bad)
    with pytest.raises(DataError, match=r"part-7.parquet, row group 0: 1 interaction.*999999"):
        list(data.batches(64, torch.Generator().manual_seed(0)))
    dropped = _data(bad, "data.stream.unknown_items=drop")
    count = sum(len(b.positives) for b in dropped.batches(64, torch.Generator().manual_seed(0)))
    assert count == 499


def test_in_memory_commands_refuse_a_stream_source(stream_dir):
    config = load_config(stream_dir / "config.yaml")
    with pytest.raises(ConfigError, match="read by training only"):
        load_data(config)


def test_streamed_data_offers_the_training_examples_interface(
    stream_dir, training_examples_members
):
    data = _data(stream_dir)
    missing = [name for name in training_examples_members if not hasattr(data, name)]
    assert missing == []
    assert data.num_queries == len(next(iter(data.queries.values())))
    assert data.popularity is None


def test_streamed_examples_carry_their_rows_weights(stream_dir):
    """An epoch's weights are the weight column's values, each row's once (here the
    rows' sessions count, capped)."""
    data = _data(stream_dir, "data.stream.weight=sessions")
    items = pq.read_table(stream_dir / "items.parquet")
    counts = data.item_counts()
    weighted = StreamingTrainingData(
        data.config, data.pipeline, items, counts, weights="capped", weight_cap=8.0
    )
    batches = weighted.batches(500, torch.Generator().manual_seed(0))
    got = torch.cat([batch.weights for batch in batches]).numpy()
    column = pq.read_table(stream_dir / "train", columns=["sessions"]).column("sessions")
    expected = np.minimum(column.to_numpy(), 8.0)
    np.testing.assert_allclose(np.sort(got), np.sort(expected), rtol=1e-6)
    unnamed = dataclasses.replace(data.config, weight=None)
    with pytest.raises(ConfigError, match="name the rows' weight column in data.stream.weight"):
        StreamingTrainingData(unnamed, data.pipeline, items, counts, weights="raw")


def test_raw_logs_hold_the_streams_events_and_users(stream_dir, tmp_path):
    """``write_synthetic_stream(raw=True)`` with the same settings: every event of the stream's
    train, valid and test rows, unsplit, and each user's features once in a table."""
    synth = StreamSynthConfig(interactions=12_000, num_items=600, per_user=20, num_clusters=8)
    paths = write_synthetic_stream(synth, tmp_path, raw=True)
    events = ["user_id", "item_id", "timestamp"]
    stream = pa.concat_tables(
        [
            pq.read_table(stream_dir / "train"),
            pq.read_table(stream_dir / "valid.parquet"),
            pq.read_table(stream_dir / "test.parquet"),
        ]
    )
    raw = pq.read_table(paths["interactions"])
    assert raw.column_names == events
    assert sorted(raw.select(events).to_pylist(), key=str) == sorted(
        stream.select(events).to_pylist(), key=str
    )
    users = pq.read_table(paths["users"])
    assert users.column("user_id").to_pylist() == sorted(set(raw["user_id"].to_pylist()))
    inline = {
        row["user_id"]: row for row in stream.drop_columns(["item_id", "timestamp"]).to_pylist()
    }
    assert users.to_pylist() == [inline[u] for u in users["user_id"].to_pylist()]
    assert pq.read_table(paths["items"]).equals(pq.read_table(stream_dir / "items.parquet"))
