"""Id dropout (``IdFeature.dropout``): the rate, what is left alone, the seed, the
settings refused."""

from __future__ import annotations

import pytest
import torch

from twotower.features.dropout import drop_ids, dropout_rates
from twotower.features.specs import IdFeature, MultiHotFeature, TextFeature
from twotower.features.transform import MISSING, OOV


def _codes(rows: int) -> torch.Tensor:
    return torch.arange(rows, dtype=torch.int64) % 1000 + 2  # every row a known id


def test_the_rate_holds_on_many_rows() -> None:
    rows, rate = 200_000, 0.25
    codes = _codes(rows)
    dropped = drop_ids({"item_id": codes}, {"item_id": rate}, torch.Generator().manual_seed(0))
    share = (dropped["item_id"] == OOV).double().mean().item()
    # the share of Bernoulli(0.25) draws: its standard deviation is about 0.001
    assert abs(share - rate) < 0.005
    kept = dropped["item_id"] != OOV
    assert torch.equal(dropped["item_id"][kept], codes[kept])  # the others untouched


def test_each_batch_draws_its_own_mask_from_the_generator() -> None:
    codes = {"item_id": _codes(64), "title": torch.ones(64, 5, dtype=torch.int64)}
    rates = {"item_id": 0.5}
    first = drop_ids(codes, rates, torch.Generator().manual_seed(3))
    again = drop_ids(codes, rates, torch.Generator().manual_seed(3))
    assert torch.equal(first["item_id"], again["item_id"])  # the same seed, the same mask
    generator = torch.Generator().manual_seed(3)
    one, two = (drop_ids(codes, rates, generator)["item_id"] for _ in range(2))
    assert not torch.equal(one, two)  # the generator moves on
    assert first["title"] is codes["title"]  # a feature that does not drop: as given
    assert torch.equal(codes["item_id"], _codes(64))  # the inputs given are not changed


def test_missing_ids_stay_missing() -> None:
    codes = torch.tensor([MISSING, OOV, 5, MISSING, 7])
    dropped = drop_ids({"user_id": codes}, {"user_id": 0.99}, torch.Generator().manual_seed(0))
    assert dropped["user_id"].tolist() == [MISSING, OOV, OOV, MISSING, OOV]


def test_no_rate_no_change() -> None:
    inputs = {"item_id": _codes(8)}
    assert drop_ids(inputs, {}, torch.Generator()) is inputs
    specs = [
        IdFeature("item_id", "item_id", dropout=0.3),
        IdFeature("brand", "brand"),
        TextFeature("title", "title"),
        MultiHotFeature("genres", "genres"),
    ]
    assert dropout_rates(specs) == {"item_id": 0.3}


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"dropout": 1.0}, r"dropout must be in \[0, 1\)"),
        ({"dropout": -0.1}, r"dropout must be in \[0, 1\)"),
        ({"dropout": 0.2, "hash_buckets": 100}, "hashed ids .* have no vocabulary"),
    ],
)
def test_bad_dropout(settings: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        IdFeature("item_id", "item_id", **settings)
