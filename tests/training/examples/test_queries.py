"""Query-level training: each batch against a Python loop over each query's items, the
objective against one row per positive, the epoch's draws, config checks, and a run
that learns and resumes exactly."""

from __future__ import annotations

import dataclasses

import pyarrow as pa
import pytest
import torch

from twotower.config import apply_overrides, load_config
from twotower.data.dataset import ITEM_IDX, QUERY_IDX, TIMESTAMP
from twotower.errors import ConfigError
from twotower.features.pipeline import FeaturePipeline
from twotower.sources import load_data
from twotower.training.distributed import Collective
from twotower.training.examples import QueryTrainingData
from twotower.training.full_softmax import FullSoftmax, KnownPairs
from twotower.training.run import train_run

HISTORY = "features.query.history"
QUERY_LEVEL = ["training.objective.kind=full", "training.examples=queries"]


@pytest.fixture(scope="module")
def data(small_config) -> QueryTrainingData:
    config = apply_overrides(small_config, [f"{HISTORY}.max_len=6"])
    dataset, split = load_data(config)
    pipeline = FeaturePipeline.fit(config.features, dataset, split.train)
    return QueryTrainingData(dataset, split, pipeline, holdout=0.5)


def newest_first(data: QueryTrainingData, query: int) -> list[int]:
    """The query's training items, newest first, by a plain loop over the rows."""
    train = data.split.train
    queries, items = train[QUERY_IDX].to_pylist(), train[ITEM_IDX].to_pylist()
    times = train[TIMESTAMP].to_pylist()
    rows = sorted(
        (r for r in range(len(queries)) if queries[r] == query), key=lambda r: (times[r], r)
    )
    return [items[r] for r in reversed(rows)]


def test_a_batch_holds_the_kept_items_as_history_and_the_held_out_as_positives(data):
    queries = data.example_queries[torch.tensor([5, 0, 17, 3])]
    g = torch.Generator().manual_seed(1)
    held = torch.rand(int(data._counts[queries].sum()), generator=g) < 0.5
    batch = data.query_batch(queries, held)
    codes = data.items[data.spec.item_feature].tolist()
    at, width = 0, data.spec.max_len
    positives, owners = [], []
    for row, query in enumerate(queries.tolist()):
        items = newest_first(data, query)
        out = held[at : at + len(items)].tolist()
        at += len(items)
        kept = [codes[i] for i, h in zip(items, out, strict=True) if not h][:width]
        assert batch.query[data.spec.name][row].tolist() == kept + [0] * (width - len(kept))
        positives += [i for i, h in zip(items, out, strict=True) if h]
        owners += [row] * sum(out)
        alone = data.query_inputs(torch.tensor([query]))
        for name, values in alone.items():  # the query's other features, as they are
            if name != data.spec.name:
                assert torch.equal(batch.query[name][row], values[0])
    assert at == len(held)
    assert batch.positives.tolist() == positives and batch.owners.tolist() == owners
    assert torch.equal(batch.queries, queries)
    # each query's positives share one weight
    per_row = torch.zeros(len(queries)).index_add_(0, batch.owners, batch.weights)
    assert torch.allclose(per_row[batch.owners.unique()], torch.ones(len(batch.owners.unique())))


def test_an_epoch_has_every_query_once_and_holds_out_about_holdout(data):
    batches = list(data.batches(64, torch.Generator().manual_seed(0)))
    queries = torch.cat([b.queries for b in batches])
    assert sorted(queries.tolist()) == data.example_queries.tolist()
    assert len(batches) == data.steps(64, 1)
    held = sum(len(b.positives) for b in batches) / len(data.split.train)
    assert abs(held - 0.5) < 0.02, held  # about 5,000 draws of probability 0.5


def test_two_ranks_together_see_what_one_process_sees(data):
    """With two processes, each rank's batch is its share of the one-process batch of
    twice the size, the same items held out."""
    whole = list(data.batches(64, torch.Generator().manual_seed(3)))
    shares = [
        list(data.batches(32, torch.Generator().manual_seed(3), Collective(rank, 2)))
        for rank in (0, 1)
    ]
    for one, first, second in zip(whole, *shares, strict=True):
        assert torch.equal(one.queries, torch.cat([first.queries, second.queries]))
        assert torch.equal(one.positives, torch.cat([first.positives, second.positives]))


@pytest.mark.parametrize("mask_known", [False, True])
def test_the_objective_equals_one_row_per_positive(data, mask_known):
    """FullSoftmax.sets on B rows equals FullSoftmax on each positive's own row."""
    known = KnownPairs(data.query_idx, data.item_idx, data.num_items) if mask_known else None
    objective = FullSoftmax(data.num_items, known)
    batch = next(iter(data.batches(16, torch.Generator().manual_seed(0))))
    g = torch.Generator().manual_seed(0)
    query = torch.nn.functional.normalize(torch.randn(16, 8, generator=g), dim=1)
    table = torch.nn.functional.normalize(torch.randn(data.num_items, 8, generator=g), dim=1)
    scale = torch.tensor(12.0)
    got = objective.sets(
        query, batch.positives, batch.owners, table.__getitem__, scale, batch.weights, batch.queries
    )
    expected = objective(
        query[batch.owners],
        batch.positives,
        table.__getitem__,
        scale,
        g,
        batch.weights,
        batch.queries[batch.owners],
    )
    assert got.item() == pytest.approx(expected.item(), abs=1e-5)


def test_interaction_weights_multiply_each_positives_weight(small_config):
    """Each training row weighs its item index + 1, so a positive's weight shows which
    interaction it is."""
    dataset, split = load_data(small_config)
    weight = pa.array(split.train[ITEM_IDX].to_numpy() + 1.0)
    split = dataclasses.replace(split, train=split.train.append_column("weight", weight))
    pipeline = FeaturePipeline.fit(small_config.features, dataset, split.train)
    plain = QueryTrainingData(dataset, split, pipeline, position_weights="position")
    weighted = QueryTrainingData(dataset, split, pipeline, weights="raw")
    queries = plain.example_queries[:20]
    held = torch.rand(int(plain._counts[queries].sum()), generator=torch.Generator()) < 0.5
    alike, batch = plain.query_batch(queries, held), weighted.query_batch(queries, held)
    assert alike.weights is None  # every positive alike
    per_query = torch.zeros(20).index_add_(0, batch.owners, torch.ones(len(batch.owners)))
    expected = (batch.positives + 1.0) / per_query[batch.owners]
    torch.testing.assert_close(batch.weights, expected)


def test_query_level_training_needs_the_full_softmax_and_one_pooled_history(small_config):
    with pytest.raises(ConfigError, match="examples=queries .* needs the full objective"):
        apply_overrides(small_config, ["training.examples=queries"])
    with pytest.raises(ConfigError, match=r"holdout must be in \(0, 1\)"):
        apply_overrides(small_config, [*QUERY_LEVEL, "training.holdout=1"])
    config = apply_overrides(small_config, [f"{HISTORY}.encoder=gru"])
    dataset, split = load_data(config)
    pipeline = FeaturePipeline.fit(config.features, dataset, split.train)
    with pytest.raises(ConfigError, match=r"exactly one history feature .*'history': 'gru'"):
        QueryTrainingData(dataset, split, pipeline)


def test_a_stream_is_refused_for_query_level_training(tmp_path):
    (tmp_path / "config.yaml").write_text(
        """
data:
  source: stream
  stream: {train: train, valid: valid.parquet, test: test.parquet, items: items.parquet}
features:
  query: [{name: history, kind: history, column: user_id, item_feature: item_id}]
  item: [{name: item_id, kind: id, column: item_id}]
training: {objective: {kind: full}, examples: queries}
"""
    )
    with pytest.raises(ConfigError, match="config.yaml: .*which a stream does not hold"):
        load_config(tmp_path / "config.yaml")


def test_a_query_level_run_resumes_exactly(small_config, tmp_path):
    config = apply_overrides(
        small_config, [*QUERY_LEVEL, "training.epochs=2", "training.patience=0"]
    )
    straight = train_run(config, tmp_path / "straight")
    train_run(apply_overrides(config, ["training.epochs=1"]), tmp_path / "resumed")
    resumed = train_run(config, tmp_path / "resumed", resume=True)
    assert resumed.metrics == straight.metrics


def test_a_query_level_run_beats_popularity(small_config, popularity_recall, tmp_path):
    config = apply_overrides(
        small_config,
        [
            *QUERY_LEVEL,
            "training.objective.mask_known=true",
            "training.epochs=20",
            "training.lr=0.003",
        ],
    )
    recall = train_run(config, tmp_path).metrics["valid/recall@10"]
    assert recall > 1.4 * popularity_recall, (recall, popularity_recall)
