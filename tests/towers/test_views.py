"""Two views of each item by feature masking: each encoder's missing input against what
the fitted features give a null, the masks' probabilities, and the views' vectors."""

from __future__ import annotations

import math

import pyarrow as pa
import pytest
import torch

from twotower.data.config import SplitConfig
from twotower.data.dataset import Dataset
from twotower.data.splits import split_interactions
from twotower.features.pipeline import FeaturePipeline
from twotower.features.specs import (
    DenseFeature,
    FeaturesConfig,
    HistoryFeature,
    IdFeature,
    MultiHotFeature,
    OneHotFeature,
    TextFeature,
    VectorFeature,
)
from twotower.losses import ViewContrastiveLoss
from twotower.towers.config import MLPConfig, ModelConfig
from twotower.towers.model import TwoTower
from twotower.towers.views import item_views, masked_views

# every kind of feature an item tower can hold
FEATURES = FeaturesConfig(
    query=[
        IdFeature("user_id", "user"),
        HistoryFeature("history", "user", item_feature="item_id", max_len=4),
    ],
    item=[
        IdFeature("item_id", "item", dim=8),
        IdFeature("maker", "maker", hash_buckets=16, hash_functions=2, dim=4),
        OneHotFeature("color", "color"),
        DenseFeature("price", "price"),
        DenseFeature("views", "views", transform="log1p"),
        DenseFeature("weight", "weight", transform="bucketize", num_buckets=3, dim=4),
        MultiHotFeature("genres", "genres", dim=4),
        TextFeature("title", "title", buckets=64, dim=4),
        VectorFeature("image", "image", dim=2, normalize="standardize", missing="zero"),
        VectorFeature("text", "text", dim=3, project=4, missing="zero"),
    ],
)
ITEMS = {
    "item": ["a", "b", "c", "d", "e", "f"],
    "maker": ["m1", "m2", "m1", "m3", "m2", "m1"],
    "color": ["red", "blue", "red", "green", "blue", "red"],
    "price": [1.0, 2.0, 3.0, 4.0, 5.0, 6.0],
    "views": [10.0, 200.0, 3.0, 40.0, 5.0, 60.0],
    "weight": [0.5, 1.5, 2.5, 3.5, 4.5, 5.5],
    "genres": ["x|y", "y", "z", "x", "x|z", "y|z"],
    "title": ["red car", "blue car", "green tree", "red tree", "big car", "small tree"],
    "image": [[1.0, 2.0], [2.0, 1.0], [3.0, 5.0], [4.0, 2.0], [5.0, 4.0], [6.0, 3.0]],
    "text": [[1.0, 0.5, 0.2], [0.3, 1.0, 0.1], [0.2, 0.2, 1.0]] * 2,
}


@pytest.fixture(scope="module")
def fitted() -> tuple[FeaturePipeline, TwoTower, dict[str, torch.Tensor]]:
    """The fitted features, a model and the six items' inputs."""
    interactions = pa.table(
        {
            "query_id": ["u1", "u1", "u1", "u2", "u2", "u3", "u3", "u3"],
            "item_id": ["a", "b", "c", "d", "e", "f", "a", "b"],
            "timestamp": [1, 2, 3, 1, 2, 5, 6, 7],
        }
    )
    users = pa.table({"user": ["u1", "u2", "u3"]})
    dataset = Dataset.from_tables(
        interactions, users, pa.table(ITEMS), query_key="user", item_key="item"
    )
    split = split_interactions(dataset, SplitConfig(method="leave_last_out"))
    pipeline = FeaturePipeline.fit(FEATURES, dataset, split.train)
    torch.manual_seed(0)
    config = ModelConfig(query=MLPConfig(widths=[8]), item=MLPConfig(widths=[16, 8]))
    model = TwoTower.build(config, FEATURES, pipeline)
    return pipeline, model, pipeline.transform("item", pa.table(ITEMS))


def assert_same_inputs(model: TwoTower, inputs: dict, expected: dict) -> None:
    """Each feature's inputs equal (padded code lists to one width) and encode alike."""
    for name, encoder in model.item_tower.encoders.encoders.items():
        a, b = inputs[name], expected[name]
        if not a.is_floating_point() and a.ndim == 2 and a.shape != b.shape:  # 0 pads
            width = max(a.shape[1], b.shape[1])
            a = torch.nn.functional.pad(a, (0, width - a.shape[1]))
            b = torch.nn.functional.pad(b, (0, width - b.shape[1]))
        assert torch.equal(a, b), name
        assert torch.equal(encoder(inputs[name]), encoder(expected[name])), name


def null_inputs(pipeline: FeaturePipeline, rows: int) -> dict[str, torch.Tensor]:
    """What the fitted features give rows whose every value is missing (the oracle)."""
    nulls = {name: pa.nulls(rows, pa.table(ITEMS).schema.field(name).type) for name in ITEMS}
    return pipeline.transform("item", pa.table(nulls))


def test_each_encoder_blanks_a_feature_as_the_features_transform_a_null(fitted):
    pipeline, model, inputs = fitted
    everything = torch.ones(6, len(FEATURES.item), dtype=torch.bool)
    blanked = model.item_tower.encoders.blank(inputs, everything)
    assert_same_inputs(model, blanked, null_inputs(pipeline, 6))


def test_blank_replaces_only_the_chosen_rows_and_features(fitted):
    _, model, inputs = fitted
    rows = torch.zeros(6, len(FEATURES.item), dtype=torch.bool)
    rows[2, 3] = rows[4, 0] = True  # item c's price, item e's id
    blanked = model.item_tower.encoders.blank(inputs, rows)
    for f, spec in enumerate(FEATURES.item):
        changed = (blanked[spec.name] != inputs[spec.name]).reshape(6, -1).any(dim=1)
        assert changed.tolist() == rows[:, f].tolist(), spec.name


def test_no_masking_gives_two_identical_views(fitted):
    _, model, inputs = fitted
    first, second = masked_views(model.item_tower, inputs, 0.0, torch.Generator())
    for name in inputs:
        assert torch.equal(first[name], inputs[name]) and torch.equal(second[name], inputs[name])


def test_masking_everything_blanks_every_feature_of_both_views(fitted):
    pipeline, model, inputs = fitted
    expected = null_inputs(pipeline, 6)
    for view in masked_views(model.item_tower, inputs, 1.0, torch.Generator()):
        assert_same_inputs(model, view, expected)


def blanked_features(model: TwoTower, inputs, view) -> torch.Tensor:
    """(M, F) bool: which features of each row the view blanked (changed)."""
    return torch.stack(
        [
            (view[s.name] != inputs[s.name]).reshape(len(view[s.name]), -1).any(1)
            for s in FEATURES.item
        ],
        dim=1,
    )


@pytest.mark.parametrize("p", [0.2, 0.5])
def test_each_view_blanks_a_feature_with_probability_p_never_both(fitted, p):
    # items that differ from the missing input in every feature, so a blank shows
    pipeline, model, _ = fitted
    inputs = pipeline.transform("item", pa.table({k: v * 200 for k, v in ITEMS.items()}))
    first, second = masked_views(model.item_tower, inputs, p, torch.Generator().manual_seed(0))
    a, b = blanked_features(model, inputs, first), blanked_features(model, inputs, second)
    assert a.float().mean().item() == pytest.approx(p, abs=0.03)
    assert b.float().mean().item() == pytest.approx(p, abs=0.03)
    assert not (a & b).any()
    if p == 0.5:  # complementary halves
        assert (a ^ b).all()


def test_identical_views_make_the_loss_of_an_item_against_itself(fitted):
    _, model, inputs = fitted
    model.train()
    first, second = item_views(model.item_tower, inputs, 0.0, 0.0, torch.Generator())
    assert torch.equal(first, second)
    assert torch.allclose(first.norm(dim=1), torch.ones(6))
    # no bias coordinate here, so a view is the tower's own vector
    assert torch.allclose(first, model.item_tower(inputs), atol=1e-6)
    tau = 0.1
    z = first.double()
    closed_form = (torch.logsumexp(z @ z.T / tau, dim=1) - 1 / tau).mean()
    value = ViewContrastiveLoss(tau)(first, second)
    assert value.item() == pytest.approx(closed_form.item(), rel=1e-5)
    assert value.item() > math.log1p(5 * math.exp(-1 / tau)) - 1e-6  # orthogonal's is least


def test_masking_makes_two_views_of_every_item_differ(fitted):
    _, model, inputs = fitted
    model.eval()  # no dropout: masking alone
    first, second = item_views(model.item_tower, inputs, 0.5, 0.0, torch.Generator())
    assert (first - second).abs().amax(dim=1).min() > 1e-3


def test_dropout_makes_two_views_of_the_same_inputs_differ(fitted):
    _, model, inputs = fitted
    model.train()
    torch.manual_seed(0)
    first, second = item_views(model.item_tower, inputs, 0.0, 0.3, torch.Generator())
    assert not torch.allclose(first, second)
    model.eval()  # dropout only trains
    first, second = item_views(model.item_tower, inputs, 0.0, 0.3, torch.Generator())
    assert torch.equal(first, second)
