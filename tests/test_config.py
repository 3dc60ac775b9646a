"""The config system: YAML to typed dataclasses, loud errors, --set overrides, paths."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from twotower.config import (
    Config,
    apply_overrides,
    from_dict,
    load_config,
    save_config,
    to_dict,
)
from twotower.data.config import DataConfig, FeatureTableConfig, InteractionsConfig, SplitConfig
from twotower.errors import ConfigError
from twotower.features.specs import DenseFeature, IdFeature, TextFeature

RECIPE = """
data:
  source: files
  interactions: {path: data/ratings.csv, query_id: user, item_id: movie, weight: stars}
  items: {path: data/movies.parquet, key: movie}
  min_weight: 4
split:
  method: random
  ratios: [0.7, 0.2, 0.1]
  seed: 3
features:
  query:
    - {name: user, kind: id, column: user, dim: 16}
  item:
    - {name: movie, kind: id, column: movie}
    - {name: price, kind: dense, column: price, transform: log1p}
    - {name: title, kind: text, column: title, buckets: 1000}
seed: 11
"""


def _write(folder: Path, text: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "run.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def _error(text: str, tmp_path: Path, overrides: tuple[str, ...] = ()) -> str:
    with pytest.raises(ConfigError) as err:
        load_config(_write(tmp_path, text), overrides)
    return str(err.value)


@pytest.fixture
def config(tmp_path: Path) -> Config:
    return load_config(_write(tmp_path / "recipes", RECIPE))


# ---- YAML to dataclasses ---------------------------------------------------------------


def test_yaml_becomes_typed_dataclasses(config: Config, tmp_path: Path) -> None:
    assert config.seed == 11
    assert config.split == SplitConfig(method="random", ratios=[0.7, 0.2, 0.1], seed=3)
    assert isinstance(config.data.interactions, InteractionsConfig)
    assert config.data.interactions.query_id == "user"
    assert config.data.interactions.weight == "stars"
    assert config.data.min_weight == 4.0
    assert isinstance(config.data.min_weight, float)  # an int in YAML, widened
    assert config.data.items == FeatureTableConfig(
        path=tmp_path / "recipes" / "data" / "movies.parquet", key="movie"
    )
    assert config.features.query == [IdFeature(name="user", column="user", dim=16)]
    assert config.features.item == [
        IdFeature(name="movie", column="movie"),
        DenseFeature(name="price", column="price", transform="log1p"),
        TextFeature(name="title", column="title", buckets=1000),
    ]


def test_empty_yaml_gives_the_defaults(tmp_path: Path) -> None:
    assert load_config(_write(tmp_path, "")) == Config()


def test_relative_paths_resolve_against_the_yaml_folder(config: Config, tmp_path: Path) -> None:
    folder = tmp_path / "recipes"
    assert config.data.interactions.path == folder / "data" / "ratings.csv"
    assert config.data.items.path == folder / "data" / "movies.parquet"


def test_a_saved_config_finds_its_data_from_any_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A config read through a relative path (``twotower train configs/x.yaml``) holds
    absolute data paths, so the run's saved config (what ``evaluate`` and ``export``
    read) points at the same files from another directory; so does a relative ``--set``."""
    _write(tmp_path / "recipes", RECIPE)
    monkeypatch.chdir(tmp_path)
    config = load_config(Path("recipes") / "run.yaml", ["data.items.path=tables/items.csv"])
    assert config.data.interactions.path == tmp_path / "recipes" / "data" / "ratings.csv"
    assert config.data.items.path == tmp_path / "tables" / "items.csv"
    (tmp_path / "run").mkdir()
    save_config(config, tmp_path / "run" / "config.yaml")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert load_config(tmp_path / "run" / "config.yaml") == config
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert from_dict(Config, saved, where="") == config


def test_a_config_built_in_code_is_saved_with_absolute_paths(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A relative path in a config built in code (the demo's ``--out runs/demo``) means
    "from here": saved, it names the same file from another directory."""
    monkeypatch.chdir(tmp_path)
    data = DataConfig(
        source="files",
        interactions=InteractionsConfig(Path("runs/data/x.csv"), query_id="u", item_id="i"),
    )
    assert to_dict(data)["interactions"]["path"] == str(tmp_path / "runs" / "data" / "x.csv")
    save_config(Config(data=data), tmp_path / "config.yaml")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    loaded = load_config(tmp_path / "config.yaml")
    assert loaded.data.interactions.path == tmp_path / "runs" / "data" / "x.csv"


def test_absolute_paths_are_kept(tmp_path: Path) -> None:
    target = tmp_path / "elsewhere" / "ml-1m"
    config = load_config(_write(tmp_path / "r", f"data: {{source: movielens-1m, path: {target}}}"))
    assert config.data.path == target


# ---- errors ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "key", "expected"),
    [
        ("split: {seed: abc}", "split.seed", "expected int, got 'abc'"),
        ("seed: 1.5", "seed", "expected int, got 1.5"),
        ("seed: true", "seed", "expected int, got True"),
        ("data: {min_weight: high}", "data.min_weight", "expected float, got 'high'"),
        ("data: {synthetic: {affinity: [1]}}", "data.synthetic.affinity", "expected float"),
        ("split: {method: randm}", "split.method", "'randm' is not one of"),
        ("split: {ratios: 0.8}", "split.ratios", "expected a list"),
        ("split: 3", "split", "expected a mapping for SplitConfig"),
        ("data: {path: 3}", "data.path", "expected a path"),
        (
            "features: {item: [{name: t, kind: text, column: t, buckets: many}]}",
            "features.item[0].buckets",
            "expected int",
        ),
    ],
)
def test_wrong_type_names_the_dotted_key(
    tmp_path: Path, text: str, key: str, expected: str
) -> None:
    message = _error(text, tmp_path)
    assert f"{key}:" in message
    assert expected in message


def test_unknown_key_suggests_the_nearest(tmp_path: Path) -> None:
    message = _error("split: {methd: random}", tmp_path)
    assert "split: unknown key 'methd'" in message
    assert "did you mean 'method'?" in message
    assert "valid: method, new_items, new_items_min_count, new_items_valid, ratios, seed" in message


def test_unknown_top_level_section(tmp_path: Path) -> None:
    assert "did you mean 'features'?" in _error("featurs: {}", tmp_path)


def test_unknown_feature_field_suggests_the_nearest(tmp_path: Path) -> None:
    message = _error("features: {item: [{name: t, kind: text, column: t, bucket: 5}]}", tmp_path)
    assert "features.item[0]: unknown key 'bucket'" in message
    assert "did you mean 'buckets'?" in message


def test_unknown_feature_kind(tmp_path: Path) -> None:
    message = _error("features: {item: [{name: t, kind: txt, column: t}]}", tmp_path)
    assert "features.item[0].kind: unknown kind 'txt'" in message
    assert "did you mean 'text'?" in message
    assert "dense, history, id, multihot, onehot, text" in message


def test_feature_without_kind(tmp_path: Path) -> None:
    message = _error("features: {item: [{name: t, column: t}]}", tmp_path)
    assert "features.item[0]: expected a mapping with a 'kind'" in message


def test_feature_missing_a_required_field(tmp_path: Path) -> None:
    message = _error("features: {item: [{name: t, kind: text}]}", tmp_path)
    assert "features.item[0]:" in message
    assert "column" in message


def test_a_dataclass_check_becomes_a_config_error(tmp_path: Path) -> None:
    message = _error("split: {ratios: [0.5, 0.5]}", tmp_path)
    assert "split:" in message
    assert "summing to 1" in message


def test_duplicate_feature_names(tmp_path: Path) -> None:
    text = "features: {item: [{name: a, kind: id, column: x}, {name: a, kind: id, column: y}]}"
    assert "duplicated feature name(s) ['a']" in _error(text, tmp_path)


def test_missing_config_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")


def test_invalid_yaml(tmp_path: Path) -> None:
    assert "not valid YAML" in _error("split: [unclosed", tmp_path)


# ---- --set overrides -------------------------------------------------------------------


def test_override_scalar_and_nested(config: Config) -> None:
    changed = apply_overrides(
        config,
        [
            "seed=5",
            "split.method=time",
            "data.synthetic.num_items=50",
            "split.ratios=[0.8,0.1,0.1]",
        ],
    )
    assert changed.seed == 5
    assert changed.split.method == "time"
    assert changed.split.ratios == [0.8, 0.1, 0.1]
    assert changed.data.synthetic.num_items == 50
    assert changed.data.synthetic.num_queries == config.data.synthetic.num_queries
    assert config.seed == 11  # the original is untouched


def test_override_selects_a_feature_by_name(config: Config) -> None:
    changed = apply_overrides(config, ["features.item.title.buckets=5"])
    assert changed.features.item[2] == TextFeature(name="title", column="title", buckets=5)
    assert changed.features.item[:2] == config.features.item[:2]
    assert changed.features.query == config.features.query


def test_override_unknown_feature_name_suggests_the_nearest(config: Config) -> None:
    with pytest.raises(ConfigError) as err:
        apply_overrides(config, ["features.item.titel.buckets=5"])
    assert "no entry named 'titel'" in str(err.value)
    assert "did you mean 'title'?" in str(err.value)


def test_override_a_whole_feature_needs_a_field(config: Config) -> None:
    with pytest.raises(ConfigError, match="name a field of 'title'"):
        apply_overrides(config, ["features.item.title=5"])


def test_override_relative_path_resolves_against_cwd(
    config: Config, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    changed = apply_overrides(config, ["data.path=datasets/ml-1m", "data.items.path=/abs/i.pq"])
    assert changed.data.path == tmp_path / "datasets" / "ml-1m"
    assert changed.data.items.path == Path("/abs/i.pq")
    assert changed.data.items.key == "movie"


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("split.seed=x", "--set split.seed: expected int, got 'x'"),
        ("split.methd=random", "--set split.methd: unknown key 'methd'; did you mean 'method'?"),
        ("split.method=foo", "--set split.method: 'foo' is not one of"),
        ("split.ratios=[1,0]", "--set split.ratios: ratios must be three"),
        ("seed.x=1", "--set seed.x: 'x' is not a section"),
        ("seed", "override 'seed' is not of the form section.key=value"),
        ("=3", "is not of the form"),
    ],
)
def test_override_errors(config: Config, override: str, expected: str) -> None:
    with pytest.raises(ConfigError) as err:
        apply_overrides(config, [override])
    assert expected in str(err.value)


def test_overrides_through_load_config(tmp_path: Path) -> None:
    config = load_config(_write(tmp_path, RECIPE), ["split.seed=9"])
    assert config.split.seed == 9


# ---- to_dict round trip ----------------------------------------------------------------


def test_to_dict_round_trip(config: Config) -> None:
    assert from_dict(Config, to_dict(config), where="") == config


def test_to_dict_is_plain_data(config: Config) -> None:
    plain = to_dict(config)
    assert plain["data"]["items"]["path"] == str(config.data.items.path)
    assert plain["features"]["item"][2]["kind"] == "text"
    assert yaml.safe_load(yaml.safe_dump(plain)) == plain


def test_saved_config_loads_back_equal(config: Config, tmp_path: Path) -> None:
    path = tmp_path / "saved" / "config.yaml"
    path.parent.mkdir()
    save_config(config, path)
    assert load_config(path) == config


def test_defaults_round_trip() -> None:
    config = Config(data=DataConfig(source="synthetic"))
    assert from_dict(Config, to_dict(config), where="") == config


CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_loads(path, caplog):
    with caplog.at_level("WARNING"):
        config = load_config(path)
    assert config.features.query and config.features.item
    assert not caplog.records, caplog.text  # written in today's keys


def test_synthetic_config_is_the_demo_recipe():
    from twotower.demo import demo_config

    assert load_config(CONFIGS / "synthetic.yaml") == demo_config()


def test_a_renamed_key_still_loads_under_its_old_name(tmp_path: Path, caplog) -> None:
    """Configs saved before ``neg_per_pos`` became ``num_negatives`` (every objective's
    name for it) still load, with a warning; giving both names is an error."""
    path = tmp_path / "old.yaml"
    path.write_text("training: {objective: {kind: pointwise, neg_per_pos: 7}}\n")
    with caplog.at_level("WARNING", logger="twotower.config_io"):
        config = load_config(path)
    assert config.training.objective.num_negatives == 7
    assert "'neg_per_pos' is now called 'num_negatives'" in caplog.text
    assert apply_overrides(config, ["training.objective.neg_per_pos=3"]) == apply_overrides(
        config, ["training.objective.num_negatives=3"]
    )
    both = "training: {objective: {kind: pointwise, neg_per_pos: 7, num_negatives: 2}}\n"
    path.write_text(both)
    with pytest.raises(ConfigError, match="'neg_per_pos' is the old name of 'num_negatives'"):
        load_config(path)
    path.write_text("training: {objective: {kind: hinge, neg_per_pos: 7}}\n")
    with pytest.raises(ConfigError, match="unknown key 'neg_per_pos'"):  # only pointwise had it
        load_config(path)


def test_the_old_one_pass_key_still_loads_as_examples(tmp_path: Path, caplog) -> None:
    """``one_pass: true`` was sequence training, now ``examples: sequences``; ``one_pass:
    false`` left ``examples`` to say. Both still load, with a warning naming the new
    spelling, in YAML, in a config saved with both keys, and in an override."""
    path = tmp_path / "old.yaml"
    sequences = apply_overrides(Config(), ["training.examples=sequences"]).training
    true = "'one_pass: true' is now written 'examples: sequences'"
    false = "'one_pass: false' is now written 'examples: interactions'"
    for text, expected, warning in [
        ("training: {one_pass: true}", sequences, true),
        ("training: {one_pass: true, examples: interactions}", sequences, true),  # saved
        ("training: {one_pass: false}", Config().training, false),
    ]:
        path.write_text(text + "\n")
        caplog.clear()
        with caplog.at_level("WARNING", logger="twotower.config_io"):
            assert load_config(path).training == expected, text
        assert warning in caplog.text
    path.write_text("training: {one_pass: false, examples: queries, objective: {kind: full}}\n")
    with caplog.at_level("WARNING", logger="twotower.config_io"):
        assert load_config(path).training.examples == "queries"
    assert "'one_pass: false' is no longer read ('examples: queries' says it)" in caplog.text
    on = apply_overrides(Config(), ["training.one_pass=true"])
    assert on.training == sequences
    assert "'one_pass=true' is now written 'examples=sequences'" in caplog.text
    assert apply_overrides(on, ["training.one_pass=false"]) == Config()
    assert "one_pass" not in to_dict(on)["training"]
    path.write_text("training: {one_pass: true, examples: queries, objective: {kind: full}}\n")
    with pytest.raises(ConfigError, match="contradicts 'examples: queries'"):
        load_config(path)  # refused before too: one_pass excluded examples=queries


def test_a_history_feature_written_with_pooling_loads_as_its_encoder(tmp_path: Path) -> None:
    path = tmp_path / "old.yaml"
    path.write_text(
        "features:\n"
        "  query: [{name: h, kind: history, column: user, item_feature: movie, pooling: sum}]\n"
        "  item: [{name: movie, kind: id, column: movie}]\n"
    )
    (history,) = load_config(path).features.query
    assert history.encoder == "sum"
    path.write_text(path.read_text().replace("pooling: sum", "encoder: transformer, heads: 3"))
    with pytest.raises(ConfigError, match="3 heads do not divide the width 32"):
        load_config(path)
