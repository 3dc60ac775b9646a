"""Mined negatives in training: the window of a small model's own ranking (checked
against numpy), the share of each row's negatives they take, the mixed softmax's
correction by hand, the refresh schedule, resume, and the configs refused."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch

from tests.training.helpers import examples_and_model
from twotower.config import apply_overrides
from twotower.errors import ConfigError
from twotower.sampling import MinedNegatives
from twotower.training.config import ListwiseConfig, MiningConfig, MixedConfig
from twotower.training.evaluate import embed_all
from twotower.training.mining import NegativeMining
from twotower.training.objectives import _row_logits, build_objective
from twotower.training.run import train_run
from twotower.training.trainer import RunPlan, Trainer

MINED = "training.objective.mined_negatives"


def _fixed(mined: MinedNegatives, windows: list[list[int]]) -> MinedNegatives:
    """``mined`` holding the given windows (one per query) as if refreshed."""
    width = mined.candidates.shape[1]
    table = [sorted(w) + [mined.num_items] * (width - len(w)) for w in windows]
    mined.load_state_dict(
        {
            "candidates": torch.tensor(table, dtype=torch.int32),
            "counts": torch.tensor([len(w) for w in windows]),
            "ready": torch.tensor(True),
        }
    )
    return mined


def test_a_small_models_candidates_are_its_brute_force_window(small_config):
    data, model = examples_and_model(small_config)
    mining = NegativeMining(MiningConfig(ratio=0.5, window=(6, 30)), data, batch_size=97)
    mining.refresh(model)
    assert model.training  # eval mode for the refresh only
    # the oracle: every item scored for every query with numpy, sorted, the query's
    # training positives dropped, ranks 6..30 kept
    queries, items = (side.numpy() for side in embed_all(model, data, 1024, "train"))
    scores = queries @ items.T  # (Q, N)
    train_q, train_i = (side.numpy() for side in data.training_pairs())
    positives = [set(train_i[train_q == q].tolist()) for q in range(data.num_queries)]
    negatives = mining.negatives
    for q in np.unique(train_q):
        ranked = [i for i in np.argsort(-scores[q], kind="stable") if i not in positives[q]]
        count = int(negatives.counts[q])
        found = negatives.candidates[q, :count].tolist()
        assert sorted(found) == sorted(ranked[5:30]), q
        assert not positives[q] & set(found)


def test_a_share_of_each_rows_negatives_is_mined():
    # the easy sampler draws items 0..4 only (popularity, counts 0 elsewhere); every
    # window lies in 5..9: a row's mined negatives are told from its easy ones by id
    counts = np.array([3, 1, 2, 5, 4, 0, 0, 0, 0, 0])
    config = ListwiseConfig(
        sampler="popularity", num_negatives=8, mined_negatives=MiningConfig(ratio=0.3)
    )
    mined = MinedNegatives(3, 10, (1, 3), max_candidates=100)
    objective = build_objective(config, counts, mined=mined)
    queries, positives = torch.tensor([0, 1, 2, 1]), torch.tensor([0, 1, 2, 3])
    generator = torch.Generator().manual_seed(0)
    before = objective.negatives(positives, queries, generator)
    assert before.shape == (4, 8) and bool((before < 5).all())  # not refreshed: all easy
    windows = [[5, 6, 7], [8, 9], [7]]
    _fixed(mined, windows)
    negatives = objective.negatives(positives, queries, generator)
    assert negatives.shape == (4, 8)
    hard = negatives >= 5
    assert hard.sum(dim=1).tolist() == [2, 2, 2, 2]  # round(0.3 * 8) = 2 of 8 each row
    assert bool(hard[:, :2].all())  # the mined ones come first
    for b, q in enumerate(queries.tolist()):
        assert set(negatives[b, :2].tolist()) <= set(windows[q])


def test_mixed_softmax_with_mined_negatives_by_hand():
    # 6 items on the unit circle, counts 1..6 (p_j = count_j / 21); two rows (queries
    # 0 and 1, positives 0 and 1); num_sampled 1, all of it mined (ratio 1), so the
    # shared candidates are the batch [0, 1] alone, and each row adds its one mined
    # candidate: query 0's window holds item 3, query 1's item 4 (c = 1, h = 1).
    angles = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 2.5])
    items = torch.stack([torch.cos(angles), torch.sin(angles)], dim=1)
    counts = np.arange(1, 7)
    config = MixedConfig(num_sampled=1, mined_negatives=MiningConfig(ratio=1.0))
    mined = _fixed(MinedNegatives(2, 6, (1, 1), max_candidates=100), [[3], [4]])
    objective = build_objective(config, counts, mined=mined)
    query = torch.tensor([[1.0, 0.0], [0.6, 0.8]])
    positives, queries, scale = torch.tensor([0, 1]), torch.tensor([0, 1]), torch.tensor(3.0)
    loss = objective(query, positives, lambda i: items[i], scale, torch.Generator(), None, queries)

    # The oracle: logit = 3 cos - log(expected occurrences among the row's candidates):
    # 2 p_j from the batch, + h / c = 1 where j is the row's mined candidate.
    p = counts / 21
    expected = 0.0
    for b, mine in enumerate([3, 4]):
        columns = [(j, 2 * p[j]) for j in (0, 1)] + [(mine, 2 * p[mine] + 1.0)]
        logits = [3 * float(query[b] @ items[j]) - math.log(q) for j, q in columns]
        expected -= logits[b] - math.log(sum(math.exp(v) for v in logits))
    assert float(loss) == pytest.approx(expected / 2, rel=1e-6)
    # before a refresh it is the plain mixed softmax over all m uniform draws
    assert objective.sampler.num_sampled == 1 and objective.mined.sampler.num_sampled == 0


@pytest.mark.parametrize("num_items", [30, 5_000])  # U <= h D: one (B, U) product; else per row
def test_each_rows_mined_logits_and_gradients_are_its_own_dot_products(num_items):
    generator = torch.Generator().manual_seed(0)
    table = torch.randn(num_items, 4, generator=generator, requires_grad=True)
    query = torch.randn(6, 4, generator=generator, requires_grad=True)
    items = torch.randint(0, num_items, (6, 8), generator=generator)  # h D = 32
    got = _row_logits(query, items, lambda ids: table[ids] * 2.0)
    (got * torch.arange(48.0).view(6, 8)).sum().backward()
    grads = query.grad.clone(), table.grad.clone()
    query.grad, table.grad = None, None
    want = (query[:, None, :] * table[items] * 2.0).sum(-1)  # the oracle: row by row
    (want * torch.arange(48.0).view(6, 8)).sum().backward()
    assert torch.allclose(got, want, atol=1e-5)
    assert torch.allclose(grads[0], query.grad, atol=1e-4)
    assert torch.allclose(grads[1], table.grad, atol=1e-4)


@pytest.mark.parametrize(
    ("every", "warmup", "steps"),
    [(4, None, [4, 8, 12]), (4, 1, [1, 5, 9, 13]), ("epoch", None, [5, 10])],
)
def test_the_refresh_follows_its_schedule(
    small_config, tmp_path, monkeypatch, every, warmup, steps
):
    config = apply_overrides(
        small_config,
        [
            "training.objective.kind=listwise",
            f"{MINED}.ratio=0.5",
            f"{MINED}.window=[11, 60]",
            f"{MINED}.every={every}",
            f"{MINED}.warmup={'null' if warmup is None else warmup}",
            "training.epochs=3",
            "training.patience=0",
            "training.steps_per_epoch=5",
        ],
    )
    data, model = examples_and_model(config)
    trainer = Trainer(model, data, RunPlan(config.training), tmp_path, seed=0)
    refreshed, refresh = [], NegativeMining.refresh

    def counted(self, model):
        refreshed.append(trainer.state.step)
        refresh(self, model)

    monkeypatch.setattr(NegativeMining, "refresh", counted)
    trainer.fit()
    assert trainer.state.step == 15
    assert refreshed == steps


def test_resumed_run_with_mined_negatives_equals_uninterrupted_run(small_config, tmp_path):
    from tests.training.test_trainer import assert_same_weights, weights

    config = apply_overrides(
        small_config,
        [
            "training.objective.kind=mixed",
            "training.objective.num_sampled=32",
            f"{MINED}.ratio=0.5",
            f"{MINED}.window=[11, 60]",
            f"{MINED}.every=4",
            "training.epochs=3",
            "training.patience=0",
        ],
    )
    straight = train_run(config, tmp_path / "straight")
    train_run(apply_overrides(config, ["training.epochs=1"]), tmp_path / "resumed")
    resumed = train_run(config, tmp_path / "resumed", resume=True)
    assert_same_weights(weights(tmp_path / "straight"), weights(tmp_path / "resumed"))
    assert resumed.metrics == straight.metrics


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["kind=in_batch", "mined_negatives.ratio=0.5"], "in_batch objective takes no mined"),
        (["kind=full", "mined_negatives.ratio=0.5"], "full objective takes no mined"),
        (["kind=listwise", "num_negatives=1", "mined_negatives.ratio=0.4"], "rounds to no"),
        (["kind=mixed", "mined_negatives.ratio=1.5"], r"ratio must be in \[0, 1\]"),
        (["kind=mixed", "mined_negatives.window=[50, 10]"], "1 <= first <= last"),
        (["kind=mixed", "mined_negatives.window=[0, 10]"], "1 <= first <= last"),
        (["kind=hinge", "mined_negatives.every=0"], "every must be >= 1 or 'epoch'"),
        (["kind=hinge", "mined_negatives.every=month"], "every"),
        (["kind=hinge", "mined_negatives.warmup=-1"], "warmup must be >= 0"),
    ],
)
def test_configs_refused_with_the_reason(small_config, overrides, message):
    with pytest.raises(ConfigError, match=message):
        apply_overrides(small_config, [f"training.objective.{o}" for o in overrides])


def test_sequence_examples_refuse_mined_negatives(small_config):
    mixed = apply_overrides(small_config, ["training.objective.kind=mixed", f"{MINED}.ratio=0.5"])
    with pytest.raises(ConfigError, match="examples='sequences' takes none"):
        apply_overrides(mixed, ["training.examples=sequences"])


def test_without_the_training_queries_mined_negatives_are_refused():
    config = MixedConfig(mined_negatives=MiningConfig(ratio=0.5))
    with pytest.raises(ConfigError, match="a stream does not"):
        build_objective(config, np.ones(10))


def test_a_table_over_the_bound_is_refused_when_training_starts(small_config, tmp_path):
    config = apply_overrides(
        small_config,
        ["training.objective.kind=listwise", f"{MINED}.ratio=0.5", f"{MINED}.max_candidates=1000"],
    )
    with pytest.raises(ConfigError, match=r"600 queries x 400 ranks = 240,000 candidates"):
        train_run(dataclasses.replace(config), tmp_path / "run")


def test_a_stream_is_refused_when_the_mining_is_built():
    class Streamed:  # what a stream's examples answer: its training pairs are not at hand
        def training_pairs(self):
            return None

    with pytest.raises(ConfigError, match="a stream does not"):
        NegativeMining(MiningConfig(ratio=0.5), Streamed(), batch_size=64)
