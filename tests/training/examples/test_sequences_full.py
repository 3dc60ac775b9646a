"""Sequence training with the full softmax (SASRec's cross-entropy over the catalogue):
the loss and its gradient against a hand computation on two queries, seen items against
a Python loop, the config's refusals, evaluation on a leave-last-out split, and a run
that learns."""

from __future__ import annotations

import pyarrow as pa
import pytest
import torch

from twotower.config import apply_overrides
from twotower.data.config import SplitConfig
from twotower.data.dataset import ITEM_IDX, QUERY_IDX, TIMESTAMP, Dataset
from twotower.data.matrix import known_before
from twotower.data.splits import split_interactions
from twotower.errors import ConfigError
from twotower.features.pipeline import FeaturePipeline
from twotower.features.specs import FeaturesConfig, HistoryFeature, IdFeature
from twotower.sources import load_data
from twotower.towers.config import MLPConfig, ModelConfig
from twotower.towers.model import TwoTower
from twotower.training.config import FullConfig
from twotower.training.examples import SequenceTrainingData
from twotower.training.objectives import build_objective
from twotower.training.run import train_run

HISTORY = "features.query.history"
SEQUENCE = [f"{HISTORY}.encoder=transformer", f"{HISTORY}.heads=2", "training.examples=sequences"]

# Two queries over items a..g, oldest first. Leave-last-out keeps u0's a b c d and
# u1's c a c for training (u1 meets c twice); max_len 3 cuts u0's into one window
# a b c d (targets b, c, d) and u1's into c a c (targets a, c).
LOG = {"u0": "abcdef", "u1": "cacbg"}
TRAINED = {"u0": "abcd", "u1": "cac"}


def tiny(mask_seen: bool = False) -> tuple[SequenceTrainingData, TwoTower, list[str]]:
    """The examples of ``LOG``, a small transformer model over them (seeded) and the
    item ids in item-index order."""
    users = [u for u, items in LOG.items() for _ in items]
    items = [i for seq in LOG.values() for i in seq]
    times = [t for seq in LOG.values() for t in range(len(seq))]
    interactions = pa.table({"query_id": users, "item_id": items, TIMESTAMP: times})
    dataset = Dataset.from_tables(interactions)
    split = split_interactions(dataset, SplitConfig())
    history = HistoryFeature("history", "query_id", "item_id", max_len=3, encoder="transformer")
    features = FeaturesConfig(query=[history], item=[IdFeature("item_id", "item_id", dim=8)])
    pipeline = FeaturePipeline.fit(features, dataset, split.train)
    data = SequenceTrainingData(dataset, split, pipeline, mask_seen=mask_seen)
    torch.manual_seed(0)
    towers = ModelConfig(query=MLPConfig(widths=[8]), item=MLPConfig(widths=[8]), temperature=0.2)
    model = TwoTower.build(towers, features, pipeline).eval()
    return data, model, dataset.items.column("item_id").to_pylist()


def by_hand(
    data: SequenceTrainingData, model: TwoTower, names: list[str], mask_seen: bool
) -> torch.Tensor:
    """The loss as the literature writes it: for every target, the query tower run on
    the items before it alone (most recent first), its logits against every item, the
    cross-entropy with the target (its query's earlier items left out with
    ``mask_seen``, the target kept); a query's positions share one weight."""
    codes = data.items[data.spec.item_feature]  # (N,) each item's history code
    vectors = model.item_tower(data.item_inputs(torch.arange(data.num_items)))  # (N, D)
    terms, weights = [], []
    for sequence in TRAINED.values():
        rows = [names.index(i) for i in sequence]
        for t in range(1, len(rows)):
            history = torch.zeros(1, data.spec.max_len, dtype=codes.dtype)
            history[0, :t] = codes[torch.tensor(rows[:t][::-1])]  # most recent first
            query = model.query_tower({data.spec.name: history})[0]  # (D,)
            logits = vectors @ query * model.scale()  # (N,)
            kept = torch.ones(data.num_items, dtype=torch.bool)
            if mask_seen:
                kept[rows[:t]] = False
            kept[rows[t]] = True
            terms.append(torch.logsumexp(logits[kept], 0) - logits[rows[t]])
            weights.append(1.0 / (len(rows) - 1))
    weights = torch.tensor(weights)
    return (torch.stack(terms) * weights).sum() / weights.sum()


@pytest.mark.parametrize("mask_seen", [False, True])
def test_the_loss_and_its_gradient_are_the_cross_entropy_by_hand(mask_seen):
    data, model, names = tiny(mask_seen)
    objective = build_objective(FullConfig(), data.item_counts())
    batch = data.window_batch(torch.arange(len(data.window_items)))
    assert len(batch.positives) == 5  # u0: b, c, d; u1: a, c
    loss = data.loss(model, objective, batch, torch.Generator())
    expected = by_hand(data, model, names, mask_seen)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    parameters = [p for p in model.parameters() if p.requires_grad]
    got = torch.autograd.grad(loss, parameters, allow_unused=True)
    want = torch.autograd.grad(expected, parameters, allow_unused=True)
    for a, b in zip(got, want, strict=True):
        if b is None:
            assert a is None or not a.any()
        else:
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


@pytest.fixture(scope="module")
def sequence_config(small_config):
    return apply_overrides(
        small_config,
        [*SEQUENCE, f"{HISTORY}.max_len=4", "training.objective={kind: full, mask_seen: true}"],
    )


def ordered(table: pa.Table) -> dict[int, list[int]]:
    """Each query's items of ``table``, oldest first (by time, then row), by a plain loop."""
    query, item = table[QUERY_IDX].to_pylist(), table[ITEM_IDX].to_pylist()
    time = table[TIMESTAMP].to_pylist()
    rows = sorted(range(len(query)), key=lambda r: (query[r], time[r], r))
    out: dict[int, list[int]] = {}
    for r in rows:
        out.setdefault(query[r], []).append(item[r])
    return out


def test_seen_items_are_every_earlier_item_of_the_query_not_only_the_windows(sequence_config):
    dataset, split = load_data(sequence_config)
    pipeline = FeaturePipeline.fit(sequence_config.features, dataset, split.train)
    data = SequenceTrainingData(dataset, split, pipeline, mask_seen=True)
    assert data.spec.max_len == 4  # most queries have several windows
    batch = data.window_batch(torch.arange(len(data.window_items)))
    at, items = batch.seen
    assert bool((at[1:] >= at[:-1]).all())  # position by position
    counts = torch.bincount(at, minlength=len(batch.positives)).tolist()
    got = [sorted(part.tolist()) for part in items.split(counts)]
    want, sequences, windows = [], ordered(split.train), {}
    for row, q in enumerate(data.window_query.tolist()):  # a query's windows in turn
        start = windows.get(q, 0) * data.spec.max_len  # the window's first item's place
        windows[q] = windows.get(q, 0) + 1
        assert sequences[q][start] == data.window_items[row, 0]
        for t in range(1, int((data.window_items[row] >= 0).sum())):
            want.append(sorted(sequences[q][: start + t]))
    assert got == want
    plain = SequenceTrainingData(dataset, split, pipeline).window_batch(torch.arange(3))
    assert plain.seen is None


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        (["training.objective={kind: full, mask_seen: true}"], "mask_seen leaves out the items"),
        (
            [
                *SEQUENCE,
                "training.objective={kind: full, mask_known: true, positives_compete: true}",
            ],
            "a sequence position has one positive",
        ),
        (
            [*SEQUENCE, "training.objective={kind: full, mask_known: true, mask_seen: true}"],
            "mask_known already leaves out every training item",
        ),
        ([*SEQUENCE, "training.objective.kind=listwise"], "in_batch, mixed or full objective"),
    ],
)
def test_options_without_a_meaning_for_sequences_are_refused_by_name(
    small_config, settings, message
):
    with pytest.raises(ConfigError, match=message):
        apply_overrides(small_config, settings)


def test_a_corpus_above_max_items_is_refused_as_for_the_full_softmax(sequence_config, tmp_path):
    config = apply_overrides(sequence_config, ["training.objective.max_items=10"])
    with pytest.raises(ConfigError, match="scores all 300 items at every step"):
        train_run(config, tmp_path)


def test_evaluation_ranks_the_last_item_after_the_whole_training_sequence(sequence_config):
    """Leave-last-out: the last item is test, the one before it validation; a query's
    history at validation is its training items, most recent first, cut at max_len, at
    test those and the validation item; each part's seen items are all that came before."""
    dataset, split = load_data(sequence_config)
    pipeline = FeaturePipeline.fit(sequence_config.features, dataset, split.train)
    data = SequenceTrainingData(dataset, split, pipeline)
    everything, width = ordered(dataset.interactions), data.spec.max_len
    valid, test = ordered(split.valid), ordered(split.test)
    codes = data.items[data.spec.item_feature]
    for part, held in (("valid", valid), ("test", test)):
        queries = torch.tensor(sorted(held))
        histories = data.query_inputs(queries, part)[data.spec.name]
        seen = known_before(split, part, dataset.num_queries, dataset.num_items)
        for row, q in enumerate(queries.tolist()):
            before = everything[q][: -1 if part == "test" else -2]
            assert held[q] == [everything[q][len(before)]]
            recent = codes[torch.tensor(before[::-1][:width])].tolist()
            assert histories[row].tolist() == recent + [0] * (width - len(recent))
            assert sorted(seen[q].indices.tolist()) == sorted(set(before))
    assert len(valid) > 0.9 * dataset.num_queries and len(test) == dataset.num_queries


def test_a_full_softmax_sequence_run_beats_popularity(small_config, popularity_recall, tmp_path):
    """Seen items masked and positions scored 50 at a time: every new path at once (the
    plain full softmax is the hand-computed case above)."""
    config = apply_overrides(
        small_config,
        [
            *SEQUENCE,
            f"{HISTORY}.max_len=10",
            "training.objective={kind: full, mask_seen: true, chunk_rows: 50}",
        ],
    )
    recall = train_run(config, tmp_path).metrics["valid/recall@10"]
    assert recall > 1.4 * popularity_recall, (recall, popularity_recall)
