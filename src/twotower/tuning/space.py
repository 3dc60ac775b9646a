"""The search space: which config keys a tuning varies, and over what.

A YAML mapping from config keys (the dotted keys of ``--set``) to ranges::

    model.temperature: {type: float, low: 0.02, high: 0.2, log: true}
    training.lr: {type: float, low: 1.0e-4, high: 1.0e-2, log: true}
    features.query.history.max_len: {type: int, low: 10, high: 50, step: 10}
    model.query.widths: {type: categorical, choices: [[64], [128, 64]]}

Each range is checked on its own (low <= high, a log range above 0, choices not empty)
and then against the config: its ends (every choice) are set on the config the way
``--set`` sets a value, so a misspelt key names the nearest valid one, and a value the
config refuses fails, before any trial starts. Keys are set in the file's order, so a
``kind`` comes before the fields it brings.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import typing
from pathlib import Path
from typing import Any

from twotower.config import Config
from twotower.config_io import from_dict, read_yaml, set_value
from twotower.errors import ConfigError

if typing.TYPE_CHECKING:
    import optuna

# Keys the tuner decides itself, with the reason a search space cannot vary them.
RESERVED = {
    "training.metric": "it is the value the tuning maximizes",
    "threads": "set it with --threads; --jobs shares it among the trials",
}


@dataclasses.dataclass(frozen=True)
class FloatRange:
    """A float in [low, high], drawn uniformly or, with ``log``, log-uniformly."""

    low: float
    high: float
    log: bool = False

    def __post_init__(self) -> None:
        if self.low > self.high:
            raise ValueError(f"low {self.low} is above high {self.high}")
        if self.log and self.low <= 0:
            raise ValueError(f"a log range needs low > 0, got low {self.low}")

    def suggest(self, trial: optuna.Trial, name: str) -> float:
        return trial.suggest_float(name, self.low, self.high, log=self.log)

    def ends(self) -> list[Any]:
        return [self.low, self.high]

    def value(self, param: Any) -> Any:
        return param


@dataclasses.dataclass(frozen=True)
class IntRange:
    """An int among low, low + step, ..., high; ``log`` draws log-uniformly (step 1)."""

    low: int
    high: int
    step: int = 1
    log: bool = False

    def __post_init__(self) -> None:
        if self.low > self.high:
            raise ValueError(f"low {self.low} is above high {self.high}")
        if self.step < 1:
            raise ValueError(f"step must be >= 1, got {self.step}")
        if (self.high - self.low) % self.step:
            raise ValueError(f"high - low ({self.high} - {self.low}) is not a multiple of step")
        if self.log and self.step != 1:
            raise ValueError(f"a log range takes every int (step 1), got step {self.step}")
        if self.log and self.low < 1:
            raise ValueError(f"a log range needs low >= 1, got low {self.low}")

    def suggest(self, trial: optuna.Trial, name: str) -> int:
        return trial.suggest_int(name, self.low, self.high, step=self.step, log=self.log)

    def ends(self) -> list[Any]:
        return [self.low, self.high]

    def value(self, param: Any) -> Any:
        return param


@dataclasses.dataclass(frozen=True)
class Choice:
    """One of ``choices``, any YAML values (a list such as widths ``[128, 64]`` too)."""

    choices: list[Any]

    def __post_init__(self) -> None:
        if not self.choices:
            raise ValueError("choices is empty")
        labels = self.labels()
        for label in labels:
            if labels.count(label) > 1:
                raise ValueError(f"choice {label!r} is listed twice")

    def labels(self) -> list[Any]:
        """What Optuna stores for each choice: scalars as they are, others as JSON text
        (Optuna's categorical values are None, bool, int, float or str)."""
        scalar = (type(None), bool, int, float, str)
        return [c if isinstance(c, scalar) else json.dumps(c) for c in self.choices]

    def suggest(self, trial: optuna.Trial, name: str) -> Any:
        return self.value(trial.suggest_categorical(name, self.labels()))

    def ends(self) -> list[Any]:
        return list(self.choices)

    def value(self, param: Any) -> Any:
        return self.choices[self.labels().index(param)]


Range = FloatRange | IntRange | Choice
RANGES: dict[str, type] = {"float": FloatRange, "int": IntRange, "categorical": Choice}


@dataclasses.dataclass(frozen=True)
class SearchSpace:
    """Config keys -> ranges, in the order the file gives them."""

    ranges: dict[str, Range]

    def suggest(self, trial: optuna.Trial) -> dict[str, Any]:
        """The trial's config values, key -> value (drawn, or fixed by an enqueued trial)."""
        return {key: r.suggest(trial, key) for key, r in self.ranges.items()}

    def values(self, params: dict[str, Any]) -> dict[str, Any]:
        """The config values of a trial's Optuna ``params`` (JSON labels -> choices)."""
        return {key: r.value(params[key]) for key, r in self.ranges.items() if key in params}

    def to_dict(self) -> dict[str, dict[str, Any]]:
        """The plain form, as the YAML gives it (a study keeps it, to check a resume)."""
        names = {cls: name for name, cls in RANGES.items()}
        return {
            k: {"type": names[type(r)], **dataclasses.asdict(r)} for k, r in self.ranges.items()
        }


def with_values(config: Config, values: dict[str, Any]) -> Config:
    """``config`` with each ``dotted.key -> value`` set, in order, as ``--set`` sets it."""
    for key, value in values.items():
        config = set_value(config, key, value, where=f"trial value {key}")
    return config


def load_space(path: Path, config: Config) -> SearchSpace:
    """Reads a search space YAML and checks it against ``config``.

    Raises:
        ConfigError: a missing or malformed file, a bad range or a key the config lacks,
            naming the file and the key.
    """
    return parse_space(read_yaml(path, "search space"), config, where=str(path))


def parse_space(raw: Any, config: Config, where: str = "search space") -> SearchSpace:
    """Builds a ``SearchSpace`` from parsed YAML, every range and key checked.

    Args:
        raw: a mapping of config keys to ranges.
        config: the config the trials vary; every key must name one of its values.
        where: what error messages start with (the file).
    """
    if not isinstance(raw, dict) or not raw:
        raise ConfigError(
            f"{where}: expected a mapping of config keys to ranges, e.g. "
            "'training.lr: {type: float, low: 1.0e-4, high: 1.0e-2, log: true}'"
        )
    ranges = {}
    for key, spec in raw.items():
        key = str(key)
        if key in RESERVED:
            raise ConfigError(f"{where}: {key} cannot be searched: {RESERVED[key]}")
        ranges[key] = _parse_range(spec, f"{where}: {key}")
        for value in ranges[key].ends():  # fails as --set would: unknown key, bad value
            set_value(config, key, value, where=f"{where}: {key}")
    return SearchSpace(ranges)


def _parse_range(spec: Any, where: str) -> Range:
    if not isinstance(spec, dict) or "type" not in spec:
        raise ConfigError(
            f"{where}: expected a range with a 'type' ({', '.join(RANGES)}), got {spec!r}"
        )
    fields = {str(k): v for k, v in spec.items() if k != "type"}
    kind = spec["type"]
    if kind not in RANGES:
        close = difflib.get_close_matches(str(kind), RANGES, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ConfigError(f"{where}: unknown type {kind!r}{hint} (valid: {', '.join(RANGES)})")
    cls = RANGES[kind]
    required = [f.name for f in dataclasses.fields(cls) if f.default is dataclasses.MISSING]
    missing = [name for name in required if name not in fields]
    if missing:
        raise ConfigError(
            f"{where}: a {kind} range needs {' and '.join(required)}; missing {', '.join(missing)}"
        )
    for name in ("low", "high"):
        if isinstance(fields.get(name), str) and _is_number(fields[name]):
            raise ConfigError(
                f"{where}.{name}: {fields[name]!r} is text to YAML; "
                "write the number with a dot, e.g. 1.0e-4"
            )
    return from_dict(cls, fields, where=where)


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True
