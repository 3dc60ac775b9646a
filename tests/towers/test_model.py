"""The towers and their score: shapes, normalization, sharing, temperature, serving path."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
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
)
from twotower.towers.config import MLPConfig, ModelConfig
from twotower.towers.encoders import FeatureEncoders, PooledEncoder, embedding_table
from twotower.towers.history import HistoryEncoder
from twotower.towers.model import Temperature, TwoTower, build_query_tower, embed_rows

FEATURES = FeaturesConfig(
    query=[
        IdFeature("user_id", "user"),
        OneHotFeature("gender", "gender"),
        DenseFeature("age", "age"),
        HistoryFeature("history", "user", item_feature="item_id", max_len=4),
    ],
    item=[
        IdFeature("item_id", "item", dim=16),
        DenseFeature("price", "price", transform="bucketize", num_buckets=3, dim=4),
        MultiHotFeature("genres", "genres", dim=8),
        TextFeature("title", "title", buckets=64, dim=8),
    ],
)


@pytest.fixture(scope="module")
def fitted() -> tuple[Dataset, FeaturePipeline]:
    interactions = pa.table(
        {
            "query_id": ["u1", "u1", "u1", "u2", "u2", "u3", "u3"],
            "item_id": ["a", "b", "c", "a", "c", "b", "d"],
            "timestamp": [1, 2, 3, 1, 2, 5, 6],
        }
    )
    users = pa.table(
        {"user": ["u1", "u2", "u3"], "gender": ["F", "M", None], "age": [31.0, None, 50.0]}
    )
    items = pa.table(
        {
            "item": ["a", "b", "c", "d"],
            "price": [1.0, 2.0, 3.0, 4.0],
            "genres": ["x|y", "y", "", "x"],
            "title": ["red car", "blue car", "green tree", "red tree"],
        }
    )
    dataset = Dataset.from_tables(interactions, users, items, query_key="user", item_key="item")
    split = split_interactions(dataset, SplitConfig(method="leave_last_out"))
    return dataset, FeaturePipeline.fit(FEATURES, dataset, split.train)


def build(pipeline: FeaturePipeline, **config) -> TwoTower:
    torch.manual_seed(0)
    defaults = {"query": MLPConfig(widths=[8]), "item": MLPConfig(widths=[8])}
    return TwoTower.build(ModelConfig(**{**defaults, **config}), FEATURES, pipeline)


def test_towers_output_unit_vectors(fitted):
    dataset, pipeline = fitted
    model = build(pipeline)
    query = model.query_tower(pipeline.transform("query", dataset.queries))
    items = model.item_tower(pipeline.transform("item", dataset.items))
    assert query.shape == (3, 8) and items.shape == (4, 8)
    assert torch.allclose(query.norm(dim=1), torch.ones(3), atol=1e-6)
    assert torch.allclose(items.norm(dim=1), torch.ones(4), atol=1e-6)


def test_score_is_cosine_over_temperature(fitted):
    dataset, pipeline = fitted
    model = build(pipeline, temperature=0.2, min_temperature=0.1)
    q = torch.nn.functional.normalize(torch.tensor([[3.0, 4.0]]), dim=1)
    i = torch.nn.functional.normalize(torch.tensor([[4.0, 3.0], [0.0, 1.0]]), dim=1)
    # cos = [24/25, 4/5]; divided by 0.2
    assert torch.allclose(model.score(q, i), torch.tensor([[0.96 / 0.2, 0.8 / 0.2]]))


def test_item_tower_is_one_parameter_set_shared_with_history(fitted):
    _, pipeline = fitted
    model = build(pipeline)
    item_table = model.item_tower.encoders.encoders["item_id"].table
    history = model.query_tower.encoders.encoders["history"]
    assert history.table is item_table  # the query side reads the item tower's table
    tables = [p for p in model.parameters() if p.shape == item_table.weight.shape]
    assert len(tables) == 1  # one item-id table in the whole model


def test_fixed_temperature_is_not_a_parameter_and_learned_one_is_clamped():
    fixed = Temperature(0.05, learn=False, min_temperature=0.01)
    assert list(fixed.parameters()) == []
    assert math.isclose(float(fixed()), 20.0, rel_tol=1e-6)
    learned = Temperature(0.05, learn=True, min_temperature=0.02)
    with torch.no_grad():
        learned.log_scale.fill_(math.log(1000.0))  # temperature 0.001, below the floor
    assert math.isclose(learned().item(), 50.0, rel_tol=1e-6)
    learned.log_scale.data.fill_(math.log(10.0))
    learned().backward()
    assert learned.log_scale.grad is not None


def test_pooled_encoder_mean_leaves_out_padding():
    table = embedding_table(5, 2, sparse=False)
    with torch.no_grad():
        table.weight.copy_(torch.tensor([[9.0, 9.0], [1.0, 0.0], [0.0, 2.0], [4.0, 4.0], [6, 0]]))
    mean = PooledEncoder(table, "mean")(torch.tensor([[1, 2, 0], [3, 0, 0], [0, 0, 0]]))
    # rows: mean of [1,0],[0,2] = [0.5,1]; [4,4]; all padding -> zeros (row 0 unused)
    assert torch.equal(mean, torch.tensor([[0.5, 1.0], [4.0, 4.0], [0.0, 0.0]]))
    total = PooledEncoder(table, "sum")(torch.tensor([[1, 2, 4]]))
    assert torch.equal(total, torch.tensor([[7.0, 2.0]]))


def test_every_feature_encoder_declares_what_the_tower_reads(fitted):
    """Ids, one-hot, dense, lists, text and histories: each encoder declares its width,
    K and timestamps (``HistoryEncoder``); the tower's width is their sum."""
    _, pipeline = fitted
    model = build(pipeline)
    for tower in (model.query_tower, model.item_tower):
        encoders = tower.encoders.encoders.values()
        assert all(isinstance(encoder, HistoryEncoder) for encoder in encoders)
        assert all((e.interests, e.times_input) == (1, None) for e in encoders)
        assert tower.encoders.output_dim == sum(encoder.width for encoder in encoders)


def test_encoders_concatenate_in_config_order_and_name_missing_inputs(fitted):
    _, pipeline = fitted
    encoders = FeatureEncoders(FEATURES.item, pipeline.sizes("item"))
    # item_id 16 + price bucket 4 + genres 8 + title 8
    assert encoders.output_dim == 36
    with pytest.raises(KeyError, match="title"):
        encoders({"item_id": torch.tensor([2])})


def test_embed_rows_of_raw_rows_equals_training_inputs(fitted):
    dataset, pipeline = fitted
    model = build(pipeline, item=MLPConfig(widths=[8], dropout=0.5))
    rows = embed_rows(model.item_tower, pipeline, "item", dataset.items, batch_size=3)
    model.eval()
    with torch.no_grad():
        expected = model.item_tower(pipeline.transform("item", dataset.items))
    assert torch.allclose(rows, expected, atol=1e-6)
    model.train()
    again = embed_rows(model.item_tower, pipeline, "item", dataset.items.take([2]))
    assert model.training and torch.allclose(again, expected[2:3], atol=1e-6)


def test_dssm_shape_is_expressible():
    dssm = FeaturesConfig(
        query=[TextFeature("query", "query", buckets=30_000, dim=300, pooling="sum")],
        item=[TextFeature("title", "title", buckets=30_000, dim=300, pooling="sum")],
    )
    network = MLPConfig(
        widths=[300, 128], activation="tanh", activate_input=True, activate_output=True
    )
    queries = pa.table({"q": ["q1"], "query": ["red shoes"]})
    items = pa.table({"i": ["i1"], "title": ["red running shoes"]})
    interactions = pa.table({"query_id": ["q1"], "item_id": ["i1"]})
    dataset = Dataset.from_tables(interactions, queries, items, query_key="q", item_key="i")
    pipeline = FeaturePipeline.fit(dssm, dataset, dataset.interactions)
    model = TwoTower.build(ModelConfig(query=network, item=network), dssm, pipeline)
    layers = [type(m).__name__ for m in model.query_tower.network.modules()][2:]
    assert layers == ["Tanh", "Linear", "Tanh", "Linear", "Tanh"]
    shapes = [tuple(p.shape) for p in model.query_tower.parameters()]
    assert shapes == [(30_001, 300), (300, 300), (300,), (128, 300), (128,)]


def test_towers_of_different_widths_are_refused(fitted):
    _, pipeline = fitted
    with pytest.raises(ValueError, match="same width"):
        build(pipeline, item=MLPConfig(widths=[16]))


def test_the_model_names_each_sides_features_and_widths(fitted):
    """Where the config alone cannot size a tower (a one-hot's width is fitted), the
    model refuses it in the config's terms: no item-bias coordinate in the widths."""
    _, pipeline = fitted
    empty = MLPConfig(widths=[])
    with pytest.raises(ValueError) as err:
        build(pipeline, query=empty, item=empty, item_bias=True)
    gender = pipeline.sizes("query")["gender"]
    query = f"user_id 32 + gender {gender} + age 2 + history 16 = {50 + gender}"
    assert f"got query {50 + gender} and item 36" in str(err.value)
    assert f"turns its features {query} into {50 + gender}" in str(err.value)
    assert "item_id 16 + price 4 + genres 8 + title 8 = 36 into 36" in str(err.value)


def test_the_config_sizes_every_feature_as_its_encoder(fitted):
    """``FeaturesConfig.encoded_widths`` (read before any data) agrees with the built
    encoders, for every feature kind; only a one-hot's width waits for the data."""
    _, pipeline = fitted
    model = build(pipeline)
    for side, tower in (("query", model.query_tower), ("item", model.item_tower)):
        built = {name: enc.width for name, enc in tower.encoders.encoders.items()}
        declared = FEATURES.encoded_widths(side)
        assert declared == {n: None if n == "gender" else w for n, w in built.items()}


def test_sparse_embeddings_give_sparse_gradients(fitted):
    dataset, pipeline = fitted
    model = build(pipeline, sparse_embeddings=True)
    query = model.query_tower(pipeline.transform("query", dataset.queries))
    items = model.item_tower(pipeline.transform("item", dataset.items))
    model.score(query, items).sum().backward()
    table = model.item_tower.encoders.encoders["item_id"].table
    assert table.weight.grad.is_sparse
    dense = model.item_tower.network.layers[0].weight
    assert not dense.grad.is_sparse and np.isfinite(dense.grad.numpy()).all()


def test_the_query_tower_alone_loads_and_matches_the_whole_model(fitted):
    """Serving builds only the query tower: the same parameters, shapes and answers as
    the two-tower model's, the item id table its history shares included."""
    dataset, pipeline = fitted
    model = build(pipeline).eval()
    alone = build_query_tower(ModelConfig(query=MLPConfig(widths=[8])), FEATURES, pipeline)
    state = model.query_tower.state_dict()
    assert {k: v.shape for k, v in alone.state_dict().items()} == {
        k: v.shape for k, v in state.items()
    }
    alone.load_state_dict(state)
    inputs = pipeline.transform("query", dataset.queries)
    torch.testing.assert_close(alone.eval()(inputs), model.query_tower(inputs))


def test_history_item_dropout_blanks_items_in_training_only(fitted):
    """In training each history item is blanked with probability p (the tower then
    reads exactly what it reads for those codes set to 0); evaluation sees them all."""
    dataset, pipeline = fitted
    history = HistoryFeature("history", "user", item_feature="item_id", max_len=4)
    dropping = dataclasses.replace(history, item_dropout=0.5)
    specs = FeaturesConfig(query=[*FEATURES.query[:3], dropping], item=FEATURES.item)
    torch.manual_seed(0)
    model = TwoTower.build(
        ModelConfig(query=MLPConfig(widths=[8]), item=MLPConfig(widths=[8])), specs, pipeline
    )
    tower = model.query_tower
    inputs = pipeline.transform("query", dataset.queries)
    codes = inputs["history"]
    torch.manual_seed(7)
    dropped = tower(inputs)
    torch.manual_seed(7)
    blanked = codes.masked_fill(torch.rand(codes.shape) < 0.5, 0)
    assert not torch.equal(blanked, codes)
    tower.eval()
    torch.testing.assert_close(dropped, tower({**inputs, "history": blanked}))
    assert not torch.equal(tower(inputs), tower({**inputs, "history": blanked}))
    with pytest.raises(ValueError, match="item_dropout must be in"):
        dataclasses.replace(history, item_dropout=1.0)


def test_item_bias_is_one_more_coordinate_of_each_side(fitted):
    """``model.item_bias``: the item vector is its unit vector and then its bias, a
    linear map of its encodings plus a learned value of its id (all 0 at the start), in
    score units times the temperature; the query vector its unit vector and then 1; so
    the score is cosine / temperature + bias, by hand. The query tower alone has the same shape."""
    dataset, pipeline = fitted
    model = build(pipeline, item_bias=True, temperature=0.5, min_temperature=0.1).eval()
    query_inputs = pipeline.transform("query", dataset.queries)
    item_inputs = pipeline.transform("item", dataset.items)
    assert torch.equal(model.item_tower(item_inputs)[:, -1], torch.zeros(4))
    bias_module = model.item_tower.bias
    assert list(bias_module.tables) == ["item_id"]  # the item side's one id feature
    with torch.no_grad():
        bias_module.linear.weight.normal_()
        bias_module.linear.bias.fill_(0.3)
        bias_module.tables["item_id"].weight.normal_()
        query, items = model.query_tower(query_inputs), model.item_tower(item_inputs)
    assert query.shape == (3, 9) and items.shape == (4, 9)
    assert torch.equal(query[:, -1], torch.ones(3))
    torch.testing.assert_close(query[:, :-1].norm(dim=1), torch.ones(3))
    torch.testing.assert_close(items[:, :-1].norm(dim=1), torch.ones(4))
    encoded = model.item_tower.encoders(item_inputs)
    per_id = bias_module.tables["item_id"].weight[item_inputs["item_id"], 0]
    logit_bias = encoded @ bias_module.linear.weight[0] + 0.3 + per_id  # in score units
    torch.testing.assert_close(items[:, -1], logit_bias * 0.5)  # times the temperature
    cosine = query[:, :-1] @ items[:, :-1].T
    torch.testing.assert_close(model.score(query, items), cosine / 0.5 + logit_bias)
    alone = build_query_tower(
        ModelConfig(query=MLPConfig(widths=[8]), item_bias=True), FEATURES, pipeline
    )
    alone.load_state_dict(model.query_tower.state_dict())
    torch.testing.assert_close(alone.eval()(query_inputs), query)
