"""Towers that end at different widths are refused when the config is read, in the
config's own terms: each side's features and their widths, and the network's output."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from twotower.config import load_config
from twotower.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = sorted(
    [*(ROOT / "configs").glob("*.yaml"), *(ROOT / "src/twotower/recipes").glob("*.yaml")]
)

# ML-1M's recipe with a user id beside the history and a title beside the item id: with
# no hidden layers (widths: []) each tower outputs its features' total width
QUERY = [
    {"name": "user_id", "kind": "id", "column": "user_id", "dim": 32},
    {"name": "history", "kind": "history", "column": "user_id", "item_feature": "item_id"},
]
ITEM = [
    {"name": "item_id", "kind": "id", "column": "item_id", "dim": 32},
    {"name": "title", "kind": "text", "column": "title"},
]


def _ml1m_with(tmp_path: Path, query: list[dict], item: list[dict]) -> Path:
    recipe = yaml.safe_load((ROOT / "configs" / "ml1m.yaml").read_text())
    recipe["features"] = {"query": query, "item": item}
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def test_towers_of_different_widths_are_refused_when_read(tmp_path: Path) -> None:
    path = _ml1m_with(tmp_path, QUERY, ITEM)
    with pytest.raises(ConfigError) as err:
        load_config(path)
    message = str(err.value)
    assert str(path) in message
    assert "user_id 32 + history 32 = 64" in message
    assert "item_id 32 + title 64 = 96" in message
    assert "query 64" in message and "item 96" in message
    assert "65" not in message and "97" not in message  # no item-bias coordinate
    assert "same" in message and "widths" in message  # how to fix it


def test_towers_of_the_same_width_are_accepted(tmp_path: Path) -> None:
    item = [*ITEM[:1], {**ITEM[1], "dim": 32}, {"name": "year", "kind": "dense", "column": "y"}]
    query = [*QUERY, {"name": "age", "kind": "dense", "column": "age"}]
    config = load_config(_ml1m_with(tmp_path, query, item))
    assert [s.name for s in config.features.item] == ["item_id", "title", "year"]


def test_widths_are_checked_after_every_override(tmp_path: Path) -> None:
    """Both towers' last widths change together: the check sees the config the
    overrides leave, not the one between two of them."""
    path = _ml1m_with(tmp_path, QUERY, ITEM)
    config = load_config(path, ["model.query.widths=[64]", "model.item.widths=[64]"])
    assert config.model.item.widths == [64]
    with pytest.raises(ConfigError, match="query 64.*item 128"):
        load_config(path, ["model.query.widths=[64]", "model.item.widths=[128]"])


def test_a_network_with_a_fixed_output_width_is_compared(tmp_path: Path) -> None:
    path = _ml1m_with(tmp_path, QUERY, ITEM)
    with pytest.raises(ConfigError, match="query 64.*item 48"):
        load_config(path, ["model.item.kind=dcn", "model.item.dim=48"])
    assert load_config(path, ["model.item.kind=dcn", "model.item.dim=64"]).model.item.dim == 64


def test_a_width_fitted_on_the_data_is_left_to_the_model(tmp_path: Path) -> None:
    """A one-hot's width is its vocabulary's size, known once fitted: the model's own
    check refuses the towers then."""
    item = [*ITEM, {"name": "genre", "kind": "onehot", "column": "genre"}]
    config = load_config(_ml1m_with(tmp_path, QUERY, item))
    assert config.features.item[-1].name == "genre"


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_every_shipped_config_and_recipe_loads(path: Path) -> None:
    config = load_config(path)
    assert config.features.query and config.features.item
