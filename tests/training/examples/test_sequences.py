"""One-pass sequence training: windows against a Python loop over each query's items,
every position's vector against the tower run on that prefix alone, config checks,
and a run that learns and resumes exactly."""

from __future__ import annotations

import dataclasses

import pyarrow as pa
import pytest
import torch

from twotower.config import apply_overrides
from twotower.data.dataset import ITEM_IDX, QUERY_IDX, TIMESTAMP
from twotower.errors import ConfigError
from twotower.features.pipeline import FeaturePipeline
from twotower.sources import load_data
from twotower.towers.model import TwoTower
from twotower.training.examples import SequenceTrainingData
from twotower.training.run import train_run

HISTORY = "features.query.history"


@pytest.fixture(scope="module")
def sequence_config(small_config):
    return apply_overrides(
        small_config,
        [f"{HISTORY}.encoder=transformer", f"{HISTORY}.max_len=4", f"{HISTORY}.heads=2"],
    )


@pytest.fixture(scope="module")
def data(sequence_config) -> SequenceTrainingData:
    dataset, split = load_data(sequence_config)
    pipeline = FeaturePipeline.fit(sequence_config.features, dataset, split.train)
    return SequenceTrainingData(dataset, split, pipeline)


def python_examples(data: SequenceTrainingData) -> dict[int, list[tuple[list[int], int]]]:
    """Each query's (history item codes, most recent first; target item) examples, by a
    plain loop: every training item but the first, with the items of its window."""
    train = data.split.train
    query, item = train[QUERY_IDX].to_pylist(), train[ITEM_IDX].to_pylist()
    time = train[TIMESTAMP].to_pylist()
    codes = data.items[data.spec.item_feature].tolist()
    max_len, examples = data.spec.max_len, {}
    for q in sorted(set(query)):
        rows = sorted((r for r in range(len(query)) if query[r] == q), key=lambda r: (time[r], r))
        items = [item[r] for r in rows]
        for n in range(1, len(items)):
            start = (n - 1) // max_len * max_len  # the first item of n's window
            history = [codes[i] for i in reversed(items[start:n])]
            examples.setdefault(q, []).append((history, items[n]))
    return examples


def test_windows_hold_every_target_once_with_its_earlier_items(data):
    batch = data.window_batch(torch.arange(len(data.window_items)))
    histories = batch.query[data.spec.name]
    got: dict[int, list] = {}
    position = 0
    for row, q in enumerate(data.window_query.tolist()):
        codes = [c for c in histories[row].tolist() if c]
        for t in range(1, len(codes) + 1):  # position t - 1 sees the oldest t items
            got.setdefault(q, []).append((codes[-t:], int(batch.positives[position])))
            position += 1
    assert position == len(batch.positives) == len(data)
    assert got == python_examples(data)


def test_every_position_is_the_tower_on_that_prefix_alone(data, sequence_config):
    torch.manual_seed(0)
    model = TwoTower.build(sequence_config.model, sequence_config.features, data.pipeline)
    tower = model.query_tower.eval()
    batch = data.window_batch(torch.arange(12))
    name = data.spec.name
    every = tower.at_positions(batch.query, name)  # (P, D)
    expected, history = [], batch.query[name]
    for row in range(len(history)):
        length = int((history[row] > 0).sum())
        for t in range(1, length + 1):  # the t oldest items, most recent first
            alone = {k: v[row : row + 1] for k, v in batch.query.items()}
            prefix = torch.zeros_like(history[row : row + 1])
            prefix[0, :t] = history[row, length - t : length]
            expected.append(tower({**alone, name: prefix})[0])
    torch.testing.assert_close(every, torch.stack(expected), rtol=0, atol=1e-5)


def test_weights_share_one_per_query_unless_positions_count_alike(data, sequence_config):
    batch = data.window_batch(torch.arange(len(data.window_items)))
    owner = data.window_query[:, None].expand(-1, data.spec.max_len)
    owner = owner[batch.query[data.spec.name] > 0]  # (P,) the query of each position
    per_query = torch.zeros(int(owner.max()) + 1).index_add_(0, owner, batch.weights)
    assert torch.allclose(per_query[owner.unique()], torch.ones(len(owner.unique())))
    dataset, split = load_data(sequence_config)
    alike = SequenceTrainingData(dataset, split, data.pipeline, position_weights="position")
    weights = alike.window_batch(torch.arange(5)).weights
    assert torch.equal(weights, torch.ones_like(weights))


def test_sequences_need_a_sequence_encoder_and_a_softmax(small_config, data):
    with pytest.raises(
        ConfigError, match="examples=sequences trains with the in_batch, mixed or full objective"
    ):
        apply_overrides(
            small_config, ["training.objective.kind=hinge", "training.examples=sequences"]
        )
    dataset, split = load_data(small_config)  # the recipe's history is mean-pooled
    pipeline = FeaturePipeline.fit(small_config.features, dataset, split.train)
    with pytest.raises(ConfigError, match=r"exactly one history feature.*'history': 'mean'"):
        SequenceTrainingData(dataset, split, pipeline)
    features = apply_overrides(
        small_config, [f"{HISTORY}.encoder=gru", f"{HISTORY}.item_dropout=0.2"]
    ).features
    pipeline = FeaturePipeline.fit(features, dataset, split.train)
    with pytest.raises(ConfigError, match=r"\['history'\] cannot drop items"):
        SequenceTrainingData(dataset, split, pipeline)


def test_a_sequence_run_resumes_exactly(sequence_config, tmp_path):
    config = apply_overrides(
        sequence_config,
        ["training.examples=sequences", "training.epochs=2", "training.patience=0"],
    )
    straight = train_run(config, tmp_path / "straight")
    train_run(apply_overrides(config, ["training.epochs=1"]), tmp_path / "resumed")
    resumed = train_run(config, tmp_path / "resumed", resume=True)
    assert resumed.metrics == straight.metrics


@pytest.mark.parametrize("encoder", ["transformer", "gru"])
def test_a_sequence_run_beats_popularity(small_config, popularity_recall, tmp_path, encoder):
    settings = [f"{HISTORY}.encoder={encoder}", f"{HISTORY}.max_len=10", f"{HISTORY}.heads=2"]
    config = apply_overrides(small_config, [*settings, "training.examples=sequences"])
    recall = train_run(config, tmp_path).metrics["valid/recall@10"]
    assert recall > 1.4 * popularity_recall, (recall, popularity_recall)


def test_interaction_weights_multiply_each_positions_weight(sequence_config):
    """Each training row weighs its item index + 1, so a position's weight shows which
    interaction it trains: its target's."""
    dataset, split = load_data(sequence_config)
    weight = pa.array(split.train[ITEM_IDX].to_numpy() + 1.0)
    split = dataclasses.replace(split, train=split.train.append_column("weight", weight))
    pipeline = FeaturePipeline.fit(sequence_config.features, dataset, split.train)
    plain = SequenceTrainingData(dataset, split, pipeline)
    weighted = SequenceTrainingData(dataset, split, pipeline, weights="raw")
    windows = torch.arange(len(plain.window_items))
    alike, batch = plain.window_batch(windows), weighted.window_batch(windows)
    assert torch.equal(batch.positives, alike.positives)
    torch.testing.assert_close(batch.weights, alike.weights * (batch.positives + 1.0))
