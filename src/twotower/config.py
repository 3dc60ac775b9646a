"""One ``Config`` composed of each part's frozen dataclass: YAML in, ``--set`` overrides.

Every part of the pipeline defines its own config dataclasses in a module beside its
code (``data/config.py``, ``features/specs.py``, ``towers/config.py``,
``training/config.py``, ``baselines/config.py``) that imports none of that part's
code; this module only composes them. The converters (type checks, nearest-key
errors, overrides) are ``twotower.config_io``'s. Relative paths in a YAML file are
resolved against that file's folder; paths given with ``--set`` are resolved against
the current directory; a config is written with absolute paths (``to_dict``), so a
run's saved config finds its files from any directory. The checks that span parts
(``check_config``: the towers' widths) run once every override is applied.
"""

from __future__ import annotations

import dataclasses
import typing
from pathlib import Path

import yaml

from twotower.baselines.config import BaselinesConfig
from twotower.config_io import apply_overrides, from_dict, read_yaml, to_dict
from twotower.data.config import DataConfig, SplitConfig
from twotower.errors import ConfigError
from twotower.features.specs import SIDES, FeaturesConfig
from twotower.storage import atomic_write
from twotower.towers.config import ModelConfig, tower_width_error
from twotower.training.config import STREAM_REFUSAL, TrainingConfig


@dataclasses.dataclass(frozen=True)
class Config:
    """The whole recipe of a run; saved resolved beside every result.

    Attributes:
        seed: seeds the split's shuffle, the weights, the shuffles and the negatives.
        threads: CPU threads torch computes with (training, evaluation, export);
            None: ``MKL_NUM_THREADS`` or ``OMP_NUM_THREADS`` where set, else the CPUs
            this process may use (``twotower.threads``).
    """

    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    split: SplitConfig = dataclasses.field(default_factory=SplitConfig)
    features: FeaturesConfig = dataclasses.field(default_factory=FeaturesConfig)
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    training: TrainingConfig = dataclasses.field(default_factory=TrainingConfig)
    baselines: BaselinesConfig = dataclasses.field(default_factory=BaselinesConfig)
    seed: int = 0
    threads: int | None = None

    def __post_init__(self) -> None:
        if self.threads is not None and self.threads < 1:
            raise ValueError(
                f"threads must be >= 1 (or unset: the CPUs available), got {self.threads}"
            )
        if self.data.streamed and self.training.in_memory_only:
            raise ValueError(STREAM_REFUSAL)
        if self.split.train_from is not None and (
            self.data.streamed or self.training.examples != "interactions"
        ):
            raise ValueError(
                "split.train_from trains on the interactions of a new period with "
                "training.examples=interactions, from data in memory (not a stream)"
            )
        if self.split.holds_new_items and self.data.streamed:
            raise ValueError(
                "split.new_items or new_items_valid holds items out of training on data in "
                "memory; a stream or a data build cannot: use a 'files' source, or leave "
                "split.new_items and split.new_items_valid at 0"
            )


def check_config(config: Config) -> None:
    """The checks across parts that hold of a whole config only, so run once every
    override is applied (``--set model.query.widths=[64] --set model.item.widths=[64]``
    passes through a config whose towers differ): the towers' output widths.

    Raises:
        ConfigError: the towers output different widths, as far as the config alone
            decides them (a one-hot's width is fitted on the data: the model checks
            that tower once built).
    """
    features, model = config.features, config.model
    widths = {side: features.encoded_widths(side) for side in SIDES}
    if not all(widths.values()):
        return  # a side without features is refused where the model is built
    outputs = {
        side: getattr(model, side).output_width(
            None if None in widths[side].values() else sum(widths[side].values())
        )
        for side in SIDES
    }
    if None not in outputs.values() and outputs["query"] != outputs["item"]:
        raise ConfigError(
            tower_width_error(widths["query"], outputs["query"], widths["item"], outputs["item"])
        )


def load_config(path: str | Path, overrides: typing.Sequence[str] = ()) -> Config:
    """Reads a YAML config and applies ``section.key=value`` overrides.

    Args:
        path: the YAML file.
        overrides: strings like ``"split.method=random"``; the value is parsed as YAML.

    Returns:
        The resolved, type-checked ``Config``.

    Raises:
        ConfigError: naming the file, for a config the checks refuse (``check_config``
            among them).
    """
    path = Path(path)
    raw = read_yaml(path, "config")
    try:
        config = from_dict(Config, raw or {}, where="", base_dir=path.parent)
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from None
    config = apply_overrides(config, overrides)
    try:
        check_config(config)
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from None
    return config


def save_config(config: Config, path: Path) -> None:
    """Writes the resolved config as YAML (atomically)."""
    text = yaml.safe_dump(to_dict(config), sort_keys=False).encode("utf-8")
    atomic_write(Path(path), lambda f: f.write(text))
