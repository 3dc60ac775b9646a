"""The model's part of the config: each tower's network and the score's temperature.

Kept apart from the modules so the config can be read without building anything.
"""

from __future__ import annotations

import dataclasses

from twotower.towers.networks import MLPConfig, NetworkConfig


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """The towers' networks and the score's temperature.

    Attributes:
        query: the query tower's network (``mlp`` or ``dcn``).
        item: the item tower's network; its output width must equal the query's.
        temperature: the score is cosine / temperature (its start value if learned).
        learn_temperature: learn it (as log 1/temperature), kept >= ``min_temperature``.
        min_temperature: the clamp for a learned temperature.
        sparse_embeddings: embedding tables produce sparse gradients, so an optimizer
            step costs in proportion to the rows a batch touched (large vocabularies).
    """

    query: NetworkConfig = dataclasses.field(default_factory=MLPConfig)
    item: NetworkConfig = dataclasses.field(default_factory=MLPConfig)
    temperature: float = 0.05
    learn_temperature: bool = False
    min_temperature: float = 0.01
    sparse_embeddings: bool = False

    def __post_init__(self) -> None:
        if not 0 < self.min_temperature <= self.temperature:
            raise ValueError(
                f"need 0 < min_temperature <= temperature, got min_temperature="
                f"{self.min_temperature}, temperature={self.temperature}"
            )
