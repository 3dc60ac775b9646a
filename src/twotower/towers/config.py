"""The model's part of the config: each tower's network and the score's temperature.

Kept apart from the modules (``networks.py``, ``model.py``) so the config can be read
without importing them: this module imports only the standard library.
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Mapping
from dataclasses import field
from typing import Literal

Activation = Literal["relu", "tanh", "gelu"]


def _check_layer_fields(widths: list[int], activation: str, dropout: float) -> None:
    """The checks shared by both configs; messages name the offending field."""
    if any(w <= 0 for w in widths):
        raise ValueError(f"widths must all be > 0, got {list(widths)}")
    if activation not in typing.get_args(Activation):
        choices = sorted(typing.get_args(Activation))
        raise ValueError(f"activation must be one of {choices}, got {activation!r}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout}")


@dataclasses.dataclass(frozen=True)
class MLPConfig:
    """A plain multilayer perceptron.

    Attributes:
        widths: the width of each Linear layer; the last is the output width.
            ``[]`` is the identity (the output is the input).
        activation: applied after every hidden layer.
        dropout: dropout probability after each hidden activation (never on the output).
        layer_norm: LayerNorm between each hidden Linear and its activation.
        activate_input: apply the activation to the input first (DSSM: the trigram
            embedding, a linear map, goes through tanh before the next layer).
        activate_output: apply the activation after the last Linear too (DSSM's
            128-d output is tanh). No effect when ``widths`` is empty.
    """

    kind: Literal["mlp"] = "mlp"
    widths: list[int] = field(default_factory=lambda: [256, 128])
    activation: Activation = "relu"
    dropout: float = 0.0
    layer_norm: bool = False
    activate_input: bool = False
    activate_output: bool = False

    def __post_init__(self) -> None:
        _check_layer_fields(self.widths, self.activation, self.dropout)

    def output_width(self, input_width: int | None) -> int | None:
        """The width it outputs for inputs of ``input_width`` (None: not known yet)."""
        return self.widths[-1] if self.widths else input_width


@dataclasses.dataclass(frozen=True)
class DCNConfig:
    """Deep & Cross Network v2 (Wang et al. 2021): cross layers and an MLP, then a projection.

    Attributes:
        cross_layers: number of cross layers (0: the cross part is the identity).
        low_rank: 0 for a full-rank D x D cross weight; r > 0 factorises it as U V^T
            of rank r, with 2 D r instead of D^2 weights.
        structure: ``stacked`` feeds the cross output into the MLP; ``parallel`` runs
            both on the input and concatenates their outputs.
        widths: the hidden widths of the deep part; ``[]`` means no deep part.
        dim: the output width (a final Linear projection).
        activation, dropout, layer_norm: as in ``MLPConfig``, for the deep part, whose
            every layer (its last included) is activated.
    """

    kind: Literal["dcn"] = "dcn"
    cross_layers: int = 2
    low_rank: int = 0
    structure: Literal["stacked", "parallel"] = "stacked"
    widths: list[int] = field(default_factory=lambda: [256, 128])
    dim: int = 128
    activation: Activation = "relu"
    dropout: float = 0.0
    layer_norm: bool = False

    def __post_init__(self) -> None:
        _check_layer_fields(self.widths, self.activation, self.dropout)
        if self.cross_layers < 0:
            raise ValueError(f"cross_layers must be >= 0, got {self.cross_layers}")
        if self.low_rank < 0:
            raise ValueError(f"low_rank must be >= 0 (0: full rank), got {self.low_rank}")
        if self.structure not in ("stacked", "parallel"):
            raise ValueError(f"structure must be 'stacked' or 'parallel', got {self.structure!r}")
        if self.dim <= 0:
            raise ValueError(f"dim must be > 0, got {self.dim}")

    def output_width(self, input_width: int | None) -> int:
        """The width it outputs, ``dim``, whatever its inputs' width."""
        return self.dim


NetworkConfig = MLPConfig | DCNConfig


def tower_width_error(
    query: Mapping[str, int | None],
    query_width: int,
    item: Mapping[str, int | None],
    item_width: int,
) -> str:
    """The message for towers that output different widths, in the config's terms.

    Args:
        query, item: each side's feature names and encoding widths (None: fitted on
            the data, not known from the config).
        query_width, item_width: each side's network output width, without the extra
            coordinate of ``item_bias``.
    """
    sides = "; ".join(
        f"model.{side} turns its features {_total(features)} into {width}"
        for side, features, width in (("query", query, query_width), ("item", item, item_width))
    )
    return (
        f"the towers must output the same width, got query {query_width} and item "
        f"{item_width} ({sides}): give model.query and model.item the same output width "
        "(the last of an mlp's widths, a dcn's dim), or, with widths [] (an mlp without "
        "layers outputs its input), features whose widths add up to the same total"
    )


def _total(widths: Mapping[str, int | None]) -> str:
    """``"a 32 + b 64 = 96"``: the widths and their sum, where each is known."""
    terms = " + ".join(
        f"{name} {'(fitted on the data)' if width is None else width}"
        for name, width in widths.items()
    )
    known = [w for w in widths.values() if w is not None]
    return terms if len(widths) == 1 or len(known) < len(widths) else f"{terms} = {sum(known)}"


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """The towers' networks and the score's temperature.

    Attributes:
        query: the query tower's network (``mlp`` or ``dcn``).
        item: the item tower's network; its output width must equal the query's
            (``twotower.config.check_config``, when the config is read).
        temperature: the score is cosine / temperature (its start value if learned).
        learn_temperature: learn it (as log 1/temperature), kept >= ``min_temperature``.
        min_temperature: the clamp for a learned temperature.
        sparse_embeddings: embedding tables produce sparse gradients, so an optimizer
            step costs in proportion to the rows a batch touched (large vocabularies).
        item_bias: add a learned bias of each item to its score, a linear map of the
            item's feature encodings plus a learned value per id of each item-side id
            feature (``towers.model.ItemBias``): score = cosine / temperature + bias.
            It is served as one more coordinate: the item vector ends with its bias
            times ``temperature``, the query vector with 1, so the index's inner
            product ranks as the score does.
    """

    query: NetworkConfig = dataclasses.field(default_factory=MLPConfig)
    item: NetworkConfig = dataclasses.field(default_factory=MLPConfig)
    temperature: float = 0.05
    learn_temperature: bool = False
    min_temperature: float = 0.01
    sparse_embeddings: bool = False
    item_bias: bool = False

    def __post_init__(self) -> None:
        if not 0 < self.min_temperature <= self.temperature:
            raise ValueError(
                f"need 0 < min_temperature <= temperature, got min_temperature="
                f"{self.min_temperature}, temperature={self.temperature}"
            )
