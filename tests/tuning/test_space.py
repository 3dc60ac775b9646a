"""The search space: each range type, its checks, and keys checked against the config."""

from __future__ import annotations

import optuna
import pytest

from twotower.config import Config
from twotower.demo import demo_config
from twotower.errors import ConfigError
from twotower.tuning.space import Choice, FloatRange, IntRange, load_space, parse_space, with_values


@pytest.fixture(scope="module")
def config() -> Config:
    return demo_config()


def test_each_range_type_is_read_with_its_options(config):
    space = parse_space(
        {
            "training.lr": {"type": "float", "low": 1.0e-4, "high": 0.01, "log": True},
            "model.temperature": {"type": "float", "low": 0.02, "high": 0.2},
            "features.query.history.max_len": {"type": "int", "low": 10, "high": 50, "step": 10},
            "training.batch_size": {"type": "int", "low": 32, "high": 512, "log": True},
            "model.query.widths": {"type": "categorical", "choices": [[64], [128, 64]]},
        },
        config,
    )
    assert space.ranges == {
        "training.lr": FloatRange(1.0e-4, 0.01, log=True),
        "model.temperature": FloatRange(0.02, 0.2),
        "features.query.history.max_len": IntRange(10, 50, step=10),
        "training.batch_size": IntRange(32, 512, log=True),
        "model.query.widths": Choice([[64], [128, 64]]),
    }
    assert list(space.to_dict()["training.lr"].items()) == [
        ("type", "float"),
        ("low", 1.0e-4),
        ("high", 0.01),
        ("log", True),
    ]


def test_a_trial_draws_inside_each_range_and_sets_the_config(config):
    space = parse_space(
        {
            "training.lr": {"type": "float", "low": 1.0e-4, "high": 0.01, "log": True},
            "features.query.history.max_len": {"type": "int", "low": 10, "high": 50, "step": 10},
            "model.query.widths": {"type": "categorical", "choices": [[64], [128, 64]]},
        },
        config,
    )
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    for _ in range(20):
        trial = study.ask()
        values = space.suggest(trial)
        assert 1.0e-4 <= values["training.lr"] <= 0.01
        assert values["features.query.history.max_len"] in (10, 20, 30, 40, 50)
        assert values["model.query.widths"] in ([64], [128, 64])
        # Optuna keeps a list choice as its JSON text; values() turns it back
        assert space.values(trial.params) == values
        tuned = with_values(config, values)
        assert tuned.training.lr == values["training.lr"]
        assert tuned.model.query.widths == values["model.query.widths"]
        history = next(f for f in tuned.features.query if f.name == "history")
        assert history.max_len == values["features.query.history.max_len"]


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ({"type": "float", "low": 0.1, "high": 0.01}, "training.lr: low 0.1 is above high 0.01"),
        ({"type": "float", "low": 0.0, "high": 0.1, "log": True}, "log range needs low > 0"),
        ({"type": "float", "low": -1.0, "high": 0.1, "log": True}, "log range needs low > 0"),
        ({"type": "int", "low": 0, "high": 8, "log": True}, "log range needs low >= 1"),
        ({"type": "int", "low": 5, "high": 1}, "low 5 is above high 1"),
        ({"type": "int", "low": 1, "high": 8, "step": 0}, "step must be >= 1"),
        ({"type": "int", "low": 1, "high": 8, "step": 2}, "not a multiple of step"),
        ({"type": "int", "low": 1, "high": 9, "step": 2, "log": True}, "log range takes every"),
        ({"type": "int", "low": 1.5, "high": 9}, "training.lr.low: expected int, got 1.5"),
        ({"type": "categorical", "choices": []}, "training.lr: choices is empty"),
        ({"type": "categorical", "choices": [0.1, 0.1]}, "choice 0.1 is listed twice"),
        ({"type": "categorical", "choices": 0.1}, "expected a list"),
        ({"type": "flaot", "low": 0.1, "high": 1.0}, "unknown type 'flaot'; did you mean 'float'?"),
        ({"low": 0.1, "high": 1.0}, "training.lr: expected a range with a 'type'"),
        ({"type": "float", "low": 0.1}, "a float range needs low and high; missing high"),
        ({"type": "categorical"}, "a categorical range needs choices; missing choices"),
        ({"type": "float", "low": 0.1, "hgih": 1.0}, "missing high"),
        ({"type": "float", "low": 0.1, "high": 1.0, "lgo": True}, "unknown key 'lgo'"),
        ({"type": "int", "low": 1, "high": 9, "stpe": 2}, "did you mean 'step'?"),
        ({"type": "float", "low": "1e-4", "high": 0.1}, "'1e-4' is text to YAML"),
        (0.1, "expected a range with a 'type'"),
    ],
)
def test_a_bad_range_fails_before_any_trial_naming_its_key(config, spec, message):
    with pytest.raises(ConfigError, match="space.yaml: training.lr") as err:
        parse_space({"training.lr": spec}, config, where="space.yaml")
    assert message in str(err.value)


def test_a_misspelt_key_names_the_nearest_one_as_set_does(config):
    spec = {"type": "float", "low": 0.02, "high": 0.2}
    with pytest.raises(ConfigError) as err:
        parse_space({"model.temperatur": spec}, config, where="space.yaml")
    assert "space.yaml: model.temperatur: unknown key 'temperatur'" in str(err.value)
    assert "did you mean 'temperature'?" in str(err.value)
    with pytest.raises(ConfigError, match="no entry named 'histroy'; did you mean 'history'"):
        parse_space(
            {"features.query.histroy.max_len": {"type": "int", "low": 5, "high": 9}}, config
        )


@pytest.mark.parametrize(
    ("key", "spec", "message"),
    [
        ("training.epochs", {"type": "float", "low": 1.0, "high": 5.0}, "expected int, got 1.0"),
        ("model.temperature", {"type": "float", "low": 0.0, "high": 0.1}, "min_temperature"),
        ("training.optimizer", {"type": "categorical", "choices": ["adam", "sgd"]}, "'sgd'"),
        ("training.metric", {"type": "categorical", "choices": ["valid/ndcg@10"]}, "maximizes"),
        ("threads", {"type": "int", "low": 1, "high": 2}, "--jobs shares it"),
    ],
)
def test_a_value_the_config_refuses_fails_before_any_trial(config, key, spec, message):
    with pytest.raises(ConfigError, match=f"space.yaml: {key}") as err:
        parse_space({key: spec}, config, where="space.yaml")
    assert message in str(err.value)


def test_a_space_file_must_be_a_mapping_of_keys(config, tmp_path):
    path = tmp_path / "space.yaml"
    path.write_text("- training.lr\n")
    with pytest.raises(ConfigError, match="expected a mapping of config keys to ranges"):
        load_space(path, config)
    path.write_text("")
    with pytest.raises(ConfigError, match="expected a mapping of config keys to ranges"):
        load_space(path, config)
    with pytest.raises(ConfigError, match="search space file not found"):
        load_space(tmp_path / "missing.yaml", config)
    path.write_text("training.lr: {type: float, low: 1.0e-4, high: 1.0e-2, log: true}\n")
    assert load_space(path, config).ranges == {"training.lr": FloatRange(1e-4, 1e-2, log=True)}
