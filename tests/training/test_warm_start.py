"""Warm start (``init_from``): the earlier model carried bit for bit onto grown features,
a new period's examples, an exact resume, and clear refusals."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from twotower.config import Config, apply_overrides
from twotower.errors import ConfigError, DataError
from twotower.features.transform import OOV
from twotower.sources import load_data, open_source
from twotower.storage import sha256_file
from twotower.towers.model import TwoTower, embed_rows
from twotower.training.checkpoint import CheckpointStore
from twotower.training.run import load_model, train_run
from twotower.training.trainer import build_optimizers
from twotower.training.warm_start import INIT_FILE, WarmStart, grown_optimizer_state

GROWN = (  # the tables of ids new to the earlier run (users it never saw, rare items)
    "query_tower.encoders.encoders.user_id.table.weight",
    "item_tower.encoders.encoders.item_id.table.weight",
    "query_tower.encoders.encoders.history.table.weight",  # the item table, shared
    "item_tower.encoders.encoders.genres.table.weight",
)


@pytest.fixture(scope="module")
def earlier(small_config: Config, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run on two thirds of the users, its item ids kept only where seen 8 times:
    the full data has users and items new to it."""
    config = apply_overrides(
        small_config,
        [
            "data.sample_queries=400",
            "features.item.item_id.min_count=8",
            "features.item.genres.min_count=30",
            "training.epochs=1",
        ],
    )
    out = Path(tmp_path_factory.mktemp("earlier")) / "run"
    train_run(config, out)
    return out


@pytest.fixture(scope="module")
def later(small_config: Config) -> Config:
    """Every user and item; a time split whose training examples are its second half."""
    times = load_data(small_config)[0].column("timestamp")
    cuts = {
        name: float(np.quantile(times, q))
        for name, q in (("train_from", 0.5), ("valid_from", 0.8), ("test_from", 0.9))
    }
    return apply_overrides(
        small_config,
        [
            "split.method=time",
            *(f"split.{name}={value}" for name, value in cuts.items()),
            "training.epochs=2",
            "training.patience=0",
        ],
    )


def _initialised(config: Config, earlier: Path) -> tuple[TwoTower, list, object]:
    """The model and optimizers of a run from ``earlier`` before its first step."""
    warm = WarmStart.read(earlier, config, torch.device("cpu"))
    source = open_source(config)
    pipeline = source.fit_features(config, warm.pipeline).pipeline
    model = TwoTower.build(config.model, config.features, pipeline)
    optimizers = build_optimizers(model, config.training)
    warm.initialise(model, optimizers)
    return model, optimizers, pipeline


def test_at_step_zero_every_old_row_and_weight_is_the_earlier_models(earlier, later):
    model, _, _ = _initialised(later, earlier)
    _, _, before = load_model(earlier)
    old, new = before.state_dict(), model.state_dict()
    assert old.keys() == new.keys()
    for key, weights in old.items():
        if weights.ndim == 0:  # the temperature
            assert torch.equal(new[key], weights)
        elif key in GROWN:  # a new id starts as the earlier model's unknown id
            assert torch.equal(new[key][: len(weights)], weights), key
            added = new[key][len(weights) :]
            assert len(added) > 0, key
            assert torch.equal(added, weights[OOV].expand_as(added)), key
        else:
            assert torch.equal(new[key], weights), key


def test_at_step_zero_the_model_scores_every_input_as_the_earlier_model(earlier, later):
    model, _, pipeline = _initialised(later, earlier)
    _, old_pipeline, before = load_model(earlier)
    dataset, _ = load_data(later)
    vectors = {}
    for name, tower_of, features in (("old", before, old_pipeline), ("new", model, pipeline)):
        served = features.with_histories(dataset, dataset.interactions)
        vectors[name] = [
            embed_rows(tower_of.query_tower, served, "query", dataset.queries),
            embed_rows(tower_of.item_tower, served, "item", dataset.items),
        ]
    for old, new in zip(vectors["old"], vectors["new"], strict=True):
        assert torch.equal(old, new)  # old ids and new ones alike: new ones read as unknown
    query, item = vectors["new"]
    assert torch.equal(model.score(query, item), before.score(*vectors["old"]))


def test_the_optimizer_state_is_carried_and_a_grown_tables_moments_gain_zero_rows(earlier, later):
    _, optimizers, _ = _initialised(later, earlier)
    saved = CheckpointStore(earlier / "checkpoints").load("last")["optimizers"][0]["state"]
    state = optimizers[0].state_dict()["state"]
    assert state.keys() == saved.keys()
    grown = 0
    for index, moments in saved.items():
        for name, value in moments.items():
            carried = state[index][name]
            if value.ndim == 0:  # the step count
                assert torch.equal(carried, value)
                continue
            assert torch.equal(carried[: len(value)], value)
            assert not carried[len(value) :].any()
            grown += len(carried) > len(value)
    assert grown == 2 * 3  # Adam's two moments of the user, item and genre tables
    assert optimizers[0].param_groups[0]["lr"] == later.training.lr


@pytest.mark.filterwarnings("ignore:Sparse invariant checks")  # torch's, in Adagrad
@pytest.mark.parametrize("kind", [torch.optim.SparseAdam, torch.optim.Adagrad])
def test_a_sparse_tables_optimizer_state_grows_with_zero_rows(kind):
    old = torch.nn.Embedding(3, 2, sparse=True)
    optimizer = kind(old.parameters(), lr=0.1)
    old(torch.tensor([0, 2])).sum().backward()
    optimizer.step()
    new = torch.nn.Embedding(5, 2, sparse=True)
    grown_kind = kind(new.parameters(), lr=0.5)
    grown_kind.load_state_dict(grown_optimizer_state(optimizer.state_dict(), grown_kind))
    before, after = optimizer.state[old.weight], grown_kind.state[new.weight]
    for name, value in before.items():
        if isinstance(value, torch.Tensor) and value.ndim:  # not a step count
            assert torch.equal(after[name][:3], value) and not after[name][3:].any()
    assert grown_kind.param_groups[0]["lr"] == 0.5  # the new config's rate
    new(torch.tensor([4])).sum().backward()
    grown_kind.step()  # the grown state steps


def test_a_run_from_an_earlier_one_records_it_and_resumes_exactly_after_a_kill(
    earlier, later, tmp_path
):
    straight = train_run(later, tmp_path / "straight", init_from=earlier)

    class Killed(Exception):
        pass

    def kill_after_first_epoch(epoch: int, record: dict) -> None:
        raise Killed

    with pytest.raises(Killed):
        train_run(later, tmp_path / "resumed", init_from=earlier, on_epoch=kill_after_first_epoch)
    resumed = train_run(later, tmp_path / "resumed", resume=True, init_from=earlier)
    a, b = (
        CheckpointStore(tmp_path / n / "checkpoints").load("last")["model"]
        for n in ("straight", "resumed")
    )
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert resumed.metrics == straight.metrics
    lines = (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [1, 2]
    record = json.loads((tmp_path / "resumed" / INIT_FILE).read_text())
    checkpoint = CheckpointStore(earlier / "checkpoints").path("best")
    assert record["run"] == str(earlier.resolve())
    assert record["sha256"] == sha256_file(checkpoint)
    assert record["optimizer"] == "carried from epoch 1"
    # the lr schedule starts afresh: epoch 1 of this run is at the configured rate
    assert json.loads(lines[0])["lr"] == later.training.lr


def test_the_model_carried_is_the_one_a_run_reports_and_a_refit_starts_from_it(tiny_demo, tmp_path):
    config = tiny_demo(tmp_path / "data", "training.refit=true")
    train_run(config, tmp_path / "earlier")
    result = train_run(config, tmp_path / "later", init_from=tmp_path / "earlier")
    record = json.loads((tmp_path / "later" / INIT_FILE).read_text())
    refit = CheckpointStore(tmp_path / "earlier" / "refit" / "checkpoints")
    assert record["checkpoint"] == str(refit.path("best").resolve())  # the refit's model
    assert json.loads((tmp_path / "later" / "refit" / INIT_FILE).read_text()) == record
    assert result.metrics["refit_epochs"] == 1


def test_the_new_period_alone_is_trained_on(earlier, later, tmp_path):
    from twotower.training.examples import EXAMPLES

    source = open_source(later)
    warm = WarmStart.read(earlier, later, torch.device("cpu"))
    features = source.fit_features(later, warm.pipeline)
    data = source.examples(EXAMPLES["interactions"], later, features, torch.device("cpu"))
    examples = source.split.training_examples
    assert len(data) == examples.num_rows < source.split.train.num_rows
    rows = torch.cat([b.positives for b in data.batches(64, torch.Generator().manual_seed(0))])
    counts = np.bincount(examples.column("item_idx").to_numpy(), minlength=data.num_items)
    assert np.array_equal(np.bincount(rows.numpy(), minlength=data.num_items), counts)
    assert np.array_equal(data.item_counts(), counts)


def test_a_resumed_run_refuses_another_earlier_run(earlier, later, tmp_path):
    train_run(apply_overrides(later, ["training.epochs=1"]), tmp_path / "run", init_from=earlier)
    with pytest.raises(ConfigError, match="cannot resume with --init-from .*started from"):
        train_run(later, tmp_path / "run", resume=True, init_from=tmp_path / "other")


@pytest.mark.parametrize(
    ("override", "named"),
    [
        ("model.query.widths=[32]", r"model\.query\.widths \(\[64\] vs \[32\]\)"),
        ("features.query.user_id.dim=8", r"features\.query\.user_id\.dim \(32 vs 8\)"),
        ("features.item.price.transform=standardize", r"features\.item\.price\.transform"),
    ],
)
def test_an_incompatible_earlier_run_is_refused_naming_what_differs(
    earlier, later, tmp_path, override, named
):
    with pytest.raises(ConfigError, match=f"--init-from {earlier}: .*{named}"):
        train_run(apply_overrides(later, [override]), tmp_path / "run", init_from=earlier)
    assert not (tmp_path / "run").exists()


def test_a_missing_earlier_run_is_refused_naming_the_folder(later, tmp_path):
    with pytest.raises(DataError, match=f"--init-from {tmp_path / 'nowhere'}: no such folder"):
        train_run(later, tmp_path / "run", init_from=tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=f"{tmp_path / 'empty'}: no trained model in it"):
        train_run(later, tmp_path / "run", init_from=tmp_path / "empty")


@pytest.mark.parametrize("examples", ["sequences", "queries"])
def test_a_new_period_is_for_interaction_examples(later, examples):
    objective = "in_batch" if examples == "sequences" else "full"
    with pytest.raises(ConfigError, match="split.train_from .* training.examples=interactions"):
        apply_overrides(
            later, [f"training.objective.kind={objective}", f"training.examples={examples}"]
        )
