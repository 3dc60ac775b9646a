"""The two towers and their score: cosine similarity scaled by a temperature.

    query inputs -> FeatureEncoders -> network -> L2 normalize -> q (B, D)
    item inputs  -> FeatureEncoders -> network -> L2 normalize -> i (M, D)
    score = (q @ i.T) / temperature

With ``model.item_bias`` each side gains one coordinate: the item's vector ends with
its bias b times the temperature (``ItemBias``), the query's with 1, so that the score
is cosine / temperature + b and stays one inner product, in training and in the index
alike.

The towers meet only in the score (late fusion), so item vectors can be computed
once and indexed. One item tower embeds positives and negatives alike.

A multi-interest query tower (a history with ``interests`` K > 1) outputs K unit
vectors per query, q (B, K, D): the network runs on each interest beside the other
features. An item's score is then its best interest's (``interest_scores``), and
training scores a positive with the interest closest to it (``select_interests``).
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import pyarrow as pa
import torch
import torch.nn.functional as F
from torch import nn

from twotower.features.pipeline import FeaturePipeline
from twotower.features.specs import FeaturesConfig, HistoryFeature, IdFeature
from twotower.towers.config import ModelConfig, NetworkConfig, tower_width_error
from twotower.towers.encoders import FeatureEncoders
from twotower.towers.networks import build_network


class ItemBias(nn.Module):
    """An item's bias (``model.item_bias``): a linear map of its feature encodings plus,
    for each id feature of the item side, a learned value per id; all start at 0. An
    item with an id so has a bias of its own; one without (new to the model) still has
    its content's.

    The learned values are in units of the score itself (logits): what is appended to
    the item vector, in the units of a cosine, is their sum times ``scale``, the model's
    (starting) temperature. So an optimizer step moves a bias as far as it would move a
    logit, not 1 / temperature times as far.

    Args:
        width: the width of the concatenated encodings.
        ids: each item-side id feature's name and number of rows.
        scale: ``model.temperature``.
    """

    def __init__(self, width: int, ids: dict[str, int], scale: float) -> None:
        super().__init__()
        self.scale = scale
        self.linear = nn.Linear(width, 1)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)
        self.tables = nn.ModuleDict({name: nn.Embedding(rows, 1) for name, rows in ids.items()})
        for table in self.tables.values():
            nn.init.zeros_(table.weight)

    def forward(self, encoded: torch.Tensor, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """(B, 1) biases of (B, width) encodings and the model inputs they came from."""
        bias = self.linear(encoded)
        for name, table in self.tables.items():
            values = table(inputs[name])  # (B, 1), or (B, 2, 1) with two hash functions
            bias = bias + (values.sum(dim=1) if values.ndim == 3 else values)
        return bias * self.scale


class Tower(nn.Module):
    """One side: feature encoders, concatenated, then a network, then L2 normalization.

    Args:
        encoders, network: the feature encoders and the network over their output.
        bias: the item side's ``ItemBias``, appended to each item's vector.
        ones: the query side of a model with item biases: 1 appended to each vector.
    """

    def __init__(
        self,
        encoders: FeatureEncoders,
        network: NetworkConfig,
        bias: ItemBias | None = None,
        ones: bool = False,
    ) -> None:
        super().__init__()
        self.encoders = encoders
        self.network = build_network(network, encoders.output_dim)
        self.bias = bias
        self.ones = ones
        self.output_dim: int = self.network.output_dim + (bias is not None or ones)
        self.interests: int = encoders.interests

    def widths(self) -> tuple[dict[str, int], int]:
        """Each feature's encoding width and the network's output width (without the
        bias coordinate), as the config names them."""
        features = {name: enc.width for name, enc in self.encoders.encoders.items()}
        return features, self.network.output_dim

    def forward(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """(B, D) unit vectors of a batch of model inputs (``FeaturePipeline.transform``);
        (B, K, D) from a K-interest tower (D with the bias coordinate, if any)."""
        encoded = self.encoders(inputs)
        if encoded.ndim == 2:
            return self._finish(encoded, inputs, F.normalize(self.network(encoded), dim=-1))
        B, K, _ = encoded.shape
        vectors = F.normalize(self.network(encoded.flatten(0, 1)), dim=-1).view(B, K, -1)
        return self._finish(encoded, inputs, vectors)

    def view(self, inputs: dict[str, torch.Tensor], dropout: float = 0.0) -> torch.Tensor:
        """(B, D') unit vectors of the network's output alone (no bias coordinate), with
        dropout of probability ``dropout`` on the concatenated encodings in training: an
        item's view for a self-supervised loss (``twotower.towers.views``)."""
        encoded = F.dropout(self.encoders(inputs), dropout, self.training)
        return F.normalize(self.network(encoded), dim=-1)

    def at_positions(self, inputs: dict[str, torch.Tensor], history: str) -> torch.Tensor:
        """(P, D) unit vectors of every prefix of the ``history`` feature in one pass:
        position t of row b (oldest first) sees that row's other features and its
        history up to item t; rows in order, then positions (``FeatureEncoders``)."""
        encoded = self.encoders.at_positions(inputs, history)
        return self._finish(encoded, inputs, F.normalize(self.network(encoded), dim=-1))

    def _finish(
        self, encoded: torch.Tensor, inputs: dict[str, torch.Tensor], vectors: torch.Tensor
    ) -> torch.Tensor:
        """The vectors with the bias coordinate appended, if the tower has one."""
        if self.bias is not None:
            return torch.cat([vectors, self.bias(encoded, inputs)], dim=-1)
        if self.ones:
            return torch.cat([vectors, vectors.new_ones((*vectors.shape[:-1], 1))], dim=-1)
        return vectors


class Temperature(nn.Module):
    """The score's scale 1 / temperature, fixed or learned with a floor on temperature."""

    def __init__(self, temperature: float, learn: bool, min_temperature: float) -> None:
        super().__init__()
        log_scale = torch.tensor(math.log(1.0 / temperature))
        if learn:
            self.log_scale = nn.Parameter(log_scale)
        else:
            self.register_buffer("log_scale", log_scale)
        self.max_log_scale = math.log(1.0 / min_temperature)

    def forward(self) -> torch.Tensor:
        """The scalar 1 / temperature."""
        return self.log_scale.clamp(max=self.max_log_scale).exp()


class TwoTower(nn.Module):
    """A query tower, an item tower and the temperature of their cosine score."""

    def __init__(self, query_tower: Tower, item_tower: Tower, temperature: Temperature) -> None:
        super().__init__()
        if query_tower.output_dim != item_tower.output_dim:
            # check_config refuses what the config sizes; this, widths fitted on the data
            raise ValueError(tower_width_error(*query_tower.widths(), *item_tower.widths()))
        self.query_tower = query_tower
        self.item_tower = item_tower
        self.temperature = temperature

    @classmethod
    def build(
        cls, config: ModelConfig, features: FeaturesConfig, pipeline: FeaturePipeline
    ) -> TwoTower:
        """The model for fitted features: table sizes come from the pipeline."""
        item_encoders, bias = _item_encoders(config, features, pipeline)
        return cls(  # built in this order: the seeded initial weights depend on it
            _query_tower(config, features, pipeline, item_encoders.tables()),
            Tower(item_encoders, config.item, bias),
            Temperature(config.temperature, config.learn_temperature, config.min_temperature),
        )

    def scale(self) -> torch.Tensor:
        """1 / temperature."""
        return self.temperature()

    def score(self, query: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        """(B, M) scaled cosines (plus item biases) of (B, D) query and (M, D) item
        vectors."""
        return query @ items.T * self.scale()


def select_interests(queries: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Label-aware selection (MIND, ComiRec): each row's interest closest to its target.

    Args:
        queries: (B, K, D) a multi-interest tower's vectors, or (B, D) (returned as is).
        targets: (B, D) each row's target (positive) item vector; only its direction
            picks the interest, so no gradient flows through it.

    Returns:
        (B, D) ``queries[b, argmax_k <queries[b, k], targets[b]>]``; the gradient
        reaches the chosen interest only.
    """
    if queries.ndim == 2:
        return queries
    choice = torch.einsum("bkd,bd->bk", queries.detach(), targets.detach()).argmax(dim=1)
    return queries[torch.arange(len(queries), device=queries.device), choice]


def interest_scores(queries: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
    """(B, N) inner products of (B, D) queries with (N, D) items; for (B, K, D)
    multi-interest queries, each item's best interest's."""
    if queries.ndim == 2:
        return queries @ items.T
    return (queries @ items.T).amax(dim=1)


def build_item_tower(
    config: ModelConfig, features: FeaturesConfig, pipeline: FeaturePipeline
) -> Tower:
    """The item tower alone, shaped as ``TwoTower.build`` shapes it (for loading its
    saved weights, or as that model's item tower): its tables sized by the pipeline,
    its ``ItemBias`` where ``model.item_bias`` asks for one."""
    encoders, bias = _item_encoders(config, features, pipeline)
    return Tower(encoders, config.item, bias)


def _item_encoders(
    config: ModelConfig, features: FeaturesConfig, pipeline: FeaturePipeline
) -> tuple[FeatureEncoders, ItemBias | None]:
    """The item side's feature encoders, and its ``ItemBias`` if the model has one."""
    sparse, sizes = config.sparse_embeddings, pipeline.sizes("item")
    encoders = FeatureEncoders(features.item, sizes, sparse=sparse)
    bias = None
    if config.item_bias:
        ids = {s.name: sizes[s.name] for s in features.item if isinstance(s, IdFeature)}
        bias = ItemBias(encoders.output_dim, ids, config.temperature)
    return encoders, bias


def build_query_tower(
    config: ModelConfig, features: FeaturesConfig, pipeline: FeaturePipeline
) -> Tower:
    """The query tower alone, shaped as ``TwoTower.build`` shapes it (for loading its
    saved weights): its history features get tables of the shapes of the item id
    tables they share, and no other part of the item tower is built."""
    shared_names = {
        spec.item_feature for spec in features.query if isinstance(spec, HistoryFeature)
    }
    shared_specs = [spec for spec in features.item if spec.name in shared_names]
    sizes, sparse = pipeline.sizes("item"), config.sparse_embeddings
    shared = FeatureEncoders(shared_specs, sizes, sparse=sparse).tables() if shared_specs else {}
    return _query_tower(config, features, pipeline, shared)


def _query_tower(
    config: ModelConfig,
    features: FeaturesConfig,
    pipeline: FeaturePipeline,
    shared: dict[str, nn.Embedding],
) -> Tower:
    encoders = FeatureEncoders(
        features.query, pipeline.sizes("query"), shared, config.sparse_embeddings
    )
    return Tower(encoders, config.query, ones=config.item_bias)


def embed_rows(
    tower: Tower,
    pipeline: FeaturePipeline,
    side: str,
    table: pa.Table,
    batch_size: int = 4096,
) -> torch.Tensor:
    """(rows, D) vectors of raw feature rows, through the fitted transforms and the tower
    ((rows, K, D) from a K-interest query tower).

    The path serving takes: raw columns -> ``pipeline.transform`` -> ``tower``, in
    evaluation mode, a batch of rows at a time.
    """
    return embed_inputs(tower, pipeline.transform_chunks(side, table, batch_size))


@torch.inference_mode()
def embed_inputs(tower: Tower, chunks: Iterable[dict[str, torch.Tensor]]) -> torch.Tensor:
    """(rows, D) or (rows, K, D) vectors of model inputs given a chunk at a time
    (``FeaturePipeline.transform`` outputs), through the tower in evaluation mode."""
    device = next(tower.parameters()).device
    was_training = tower.training
    if was_training:  # switching a served tower's mode on every call costs a tree walk
        tower.eval()
    try:
        vectors = [tower({k: v.to(device) for k, v in chunk.items()}) for chunk in chunks]
    finally:
        if was_training:
            tower.train()
    if vectors:
        return torch.cat(vectors)
    shape = (
        (0, tower.output_dim) if tower.interests == 1 else (0, tower.interests, tower.output_dim)
    )
    return torch.zeros(shape, device=device)
