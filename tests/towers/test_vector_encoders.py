"""A vector feature in a tower: as it is into the network, or through a learned linear
projection; sized by the config alone; its raw rows embedded as in training."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import torch

from twotower.data.dataset import Dataset
from twotower.features.pipeline import FeaturePipeline
from twotower.features.specs import FeaturesConfig, IdFeature, VectorFeature
from twotower.towers.config import MLPConfig, ModelConfig
from twotower.towers.encoders import FeatureEncoders, ProjectionEncoder, VectorEncoder
from twotower.towers.model import TwoTower, embed_rows

FEATURES = FeaturesConfig(
    query=[IdFeature("user", "query_id", dim=4), VectorFeature("taste", "taste", dim=3)],
    item=[
        VectorFeature("image", "image", dim=5, normalize="standardize", project=6),
        VectorFeature("text", "text", dim=2, normalize="none", missing="zero"),
    ],
)


def _fitted() -> tuple[Dataset, FeaturePipeline]:
    rng = np.random.default_rng(0)
    log = pa.table({"query_id": [1, 1, 2, 3], "item_id": [10, 11, 11, 12]})
    users = pa.table({"query_id": [1, 2, 3], "taste": rng.normal(size=(3, 3)).tolist()})
    items = pa.table(
        {
            "item_id": [10, 11, 12],
            "image": rng.normal(size=(3, 5)).tolist(),
            "text": [[1.0, 2.0], None, [0.5, -1.0]],
        }
    )
    dataset = Dataset.from_tables(log, users, items, query_key="query_id", item_key="item_id")
    return dataset, FeaturePipeline.fit(FEATURES, dataset, dataset.interactions)


def test_a_vector_goes_in_as_it_is_or_through_its_projection():
    _, pipeline = _fitted()
    torch.manual_seed(0)
    encoders = FeatureEncoders(FEATURES.item, pipeline.sizes("item"))
    image, text = encoders.encoders["image"], encoders.encoders["text"]
    assert isinstance(image, ProjectionEncoder) and isinstance(text, VectorEncoder)
    assert encoders.output_dim == 6 + 2
    x = {"image": torch.randn(4, 5), "text": torch.randn(4, 2)}
    out = encoders(x)
    projected = x["image"] @ image.linear.weight.T + image.linear.bias
    assert out.shape == (4, 8)
    assert torch.allclose(out[:, :6], projected, atol=1e-6)
    assert torch.equal(out[:, 6:], x["text"])


def test_the_config_sizes_a_vector_as_its_encoder():
    _, pipeline = _fitted()
    for side in ("query", "item"):
        built = FeatureEncoders(getattr(FEATURES, side), pipeline.sizes(side), {})
        widths = {name: enc.width for name, enc in built.encoders.items()}
        assert FEATURES.encoded_widths(side) == widths


def test_raw_rows_embed_as_the_training_inputs_do():
    dataset, pipeline = _fitted()
    torch.manual_seed(0)
    network = MLPConfig(widths=[8])
    model = TwoTower.build(ModelConfig(query=network, item=network), FEATURES, pipeline)
    model.eval()
    with torch.no_grad():
        expected = model.item_tower(pipeline.transform("item", dataset.items))
    rows = embed_rows(model.item_tower, pipeline, "item", dataset.items, batch_size=2)
    assert torch.allclose(rows, expected, atol=1e-6)
    assert torch.allclose(rows.norm(dim=1), torch.ones(3), atol=1e-5)
