"""Feature encoders: each model input of a side -> a (B, width) block, concatenated.

The inputs are exactly what ``FeaturePipeline.transform`` returns, so training,
evaluation and serving feed a tower the same tensors:

    id, bucketized dense     (B,) int64   -> its own embedding table
    id, two hash functions   (B, 2) int64 -> the sum of its two rows of the table
    onehot, dense            (B, C) float -> passed through as they are
    vector                   (B, dim) float -> as it is, or a learned linear map to
                                             ``project`` wide
    multihot, text           (B, L) int64 -> pooled embedding (0 pads, left out)
    history                  (B, L) int64 -> pooled, attention-pooled, or encoded as a
                                             sequence (``towers/history/``) over the
                                             item-id table it names; or, with
                                             ``interests`` K > 1, (B, K, D) interests

With a multi-interest history the side's encoding is (B, K, output_dim): each
interest beside the same encodings of the other features.

Every encoder declares what ``FeatureEncoders`` reads of it, the attributes of
``twotower.towers.history.HistoryEncoder``: ``width``, ``interests`` (K) and
``times_input`` (the timestamps it takes beside its codes, if any).

A history feature shares the embedding table of an item-side id feature (the
item tower's), so a user is described by the same item vectors the item tower
learns. Sharing parameters does not couple the towers at scoring time: a query's
vector still depends on the query alone.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from twotower.features.specs import (
    DenseFeature,
    FeatureSpec,
    HistoryFeature,
    IdFeature,
    MultiHotFeature,
    OneHotFeature,
    TextFeature,
    VectorFeature,
)
from twotower.towers.history import (
    HISTORY_ENCODERS,
    INTEREST_EXTRACTORS,
    HistoryEncoder,
    SequenceEncoder,
)
from twotower.towers.history.order import oldest_first


def embedding_table(rows: int, dim: int, sparse: bool) -> nn.Embedding:
    """A table whose vectors start with norm near 1 (N(0, 1/dim) entries)."""
    table = nn.Embedding(rows, dim, sparse=sparse)
    nn.init.normal_(table.weight, std=dim**-0.5)
    return table


class LookupEncoder(nn.Module):
    """(B,) indices -> (B, dim) rows of an embedding table."""

    interests = 1
    times_input = None

    def __init__(self, table: nn.Embedding) -> None:
        super().__init__()
        self.table = table
        self.width = table.embedding_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.table(x)


class PooledEncoder(nn.Module):
    """(B, L) indices, 0-padded -> (B, dim) mean or sum of their embeddings.

    Padding is left out of the mean; a row of padding only pools to zeros.
    """

    interests = 1
    times_input = None

    def __init__(self, table: nn.Embedding, pooling: str) -> None:
        super().__init__()
        self.table = table
        self.pooling = pooling
        self.width = table.embedding_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_exporting():
            # ONNX has no embedding bag (an exporter writes a loop over the rows): the
            # same pooling as a gather and a masked sum
            real = (x != 0).unsqueeze(-1)  # (B, L, 1)
            total = (self.table(x) * real).sum(dim=1)
            return total if self.pooling == "sum" else total / real.sum(dim=1).clamp(min=1)
        return F.embedding_bag(
            x, self.table.weight, mode=self.pooling, padding_idx=0, sparse=self.table.sparse
        )


class VectorEncoder(nn.Module):
    """(B, C) float features (one-hot, standardized value + missing flag, a vector), as
    they are."""

    interests = 1
    times_input = None

    def __init__(self, width: int) -> None:
        super().__init__()
        self.width = width

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


class ProjectionEncoder(nn.Module):
    """(B, C) float vectors -> (B, width) through a learned linear map (with a bias)."""

    interests = 1
    times_input = None

    def __init__(self, inputs: int, width: int) -> None:
        super().__init__()
        self.linear = nn.Linear(inputs, width)
        self.width = width

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x)


class FeatureEncoders(nn.Module):
    """All encoders of one side, applied in config order and concatenated.

    Args:
        specs: the side's feature specs.
        sizes: feature name -> embedding rows or vector width (``FeaturePipeline.sizes``).
        shared: item-side id feature name -> its table, for history features.
        sparse: embedding tables produce sparse gradients (for SparseAdam / Adagrad).
    """

    def __init__(
        self,
        specs: list[FeatureSpec],
        sizes: dict[str, int],
        shared: dict[str, nn.Embedding] | None = None,
        sparse: bool = False,
    ) -> None:
        super().__init__()
        if not specs:
            raise ValueError("a tower needs at least one feature")
        self.encoders = nn.ModuleDict(
            {spec.name: _encoder(spec, sizes[spec.name], shared or {}, sparse) for spec in specs}
        )
        self.output_dim = sum(encoder.width for encoder in self.encoders.values())
        self.item_dropout = {  # history features whose items are dropped in training
            spec.name: spec.item_dropout
            for spec in specs
            if isinstance(spec, HistoryFeature) and spec.item_dropout > 0
        }
        self.interests = max(encoder.interests for encoder in self.encoders.values())

    def forward(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """(B, output_dim) the concatenated encodings of a batch of model inputs;
        (B, K, output_dim) with a K-interest history, the other features repeated."""
        missing = [name for name in self.encoders if name not in inputs]
        if missing:
            raise KeyError(f"model inputs lack feature(s) {missing}; got {sorted(inputs)}")
        if self.training and self.item_dropout:
            inputs = dict(inputs)
            for name, p in self.item_dropout.items():
                codes = inputs[name]
                inputs[name] = codes.masked_fill(
                    torch.rand(codes.shape, device=codes.device) < p, 0
                )
        parts = [_encode(enc, name, inputs) for name, enc in self.encoders.items()]
        if self.interests == 1:
            return torch.cat(parts, dim=1)
        K = self.interests
        return torch.cat([p if p.ndim == 3 else p[:, None].expand(-1, K, -1) for p in parts], 2)

    def at_positions(self, inputs: dict[str, torch.Tensor], history: str) -> torch.Tensor:
        """(P, output_dim) the encodings of every real position of a sequence-encoded
        history feature, each with its row's other features.

        Args:
            inputs: model inputs of B rows; ``inputs[history]`` (B, L) most recent first.
            history: a history feature whose encoder is a ``SequenceEncoder``
                (transformer, gru).

        Returns:
            One row per real history position: row b's positions oldest first, rows in
            order; position t encodes the history up to its t-th oldest item.
        """
        encoder = self.encoders[history]
        if self.interests > 1:
            raise ValueError("a multi-interest tower is not trained one position at a time")
        if not isinstance(encoder, SequenceEncoder):
            raise ValueError(f"history feature {history!r} has no sequence encoder")
        codes, lengths = oldest_first(inputs[history])  # (B, L), (B,)
        real = torch.arange(codes.shape[1], device=codes.device) < lengths[:, None]  # (B, L)
        rows = real.nonzero()[:, 0]  # (P,) the row of each position
        parts = [
            encoder.sequence(encoder.table(codes), lengths)[real]
            if name == history
            else _encode(other, name, inputs)[rows]
            for name, other in self.encoders.items()
        ]
        return torch.cat(parts, dim=1)

    def tables(self) -> dict[str, nn.Embedding]:
        """The id features' embedding tables, by feature name (shared with history)."""
        return {
            name: enc.table for name, enc in self.encoders.items() if isinstance(enc, LookupEncoder)
        }


def _encode(encoder: HistoryEncoder, name: str, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """One feature's encoding; an encoder that reads timestamps gets them beside."""
    extra = encoder.times_input
    return encoder(inputs[name]) if extra is None else encoder(inputs[name], inputs[extra])


def _encoder(
    spec: FeatureSpec, size: int, shared: dict[str, nn.Embedding], sparse: bool
) -> nn.Module:
    """One feature's encoder (of ``size`` embedding rows or vector width)."""
    if isinstance(spec, HistoryFeature):
        return _history_encoder(spec, shared)
    if isinstance(spec, VectorFeature) and spec.project is not None:
        return ProjectionEncoder(size, spec.project)
    if isinstance(spec, (OneHotFeature, VectorFeature)) or (
        isinstance(spec, DenseFeature) and spec.transform != "bucketize"
    ):
        return VectorEncoder(size)
    if isinstance(spec, (MultiHotFeature, TextFeature)):
        return PooledEncoder(embedding_table(size, spec.dim, sparse), spec.pooling)
    if isinstance(spec, IdFeature) and spec.hash_functions > 1:  # the sum of its rows
        return PooledEncoder(embedding_table(size, spec.dim, sparse), "sum")
    if isinstance(spec, (IdFeature, DenseFeature)):  # an id, or a bucketized value
        return LookupEncoder(embedding_table(size, spec.dim, sparse))
    raise TypeError(f"no encoder for feature kind {type(spec).__name__}")


def _history_encoder(spec: HistoryFeature, shared: dict[str, nn.Embedding]) -> HistoryEncoder:
    """A history's encoder, over the item-id table ``spec.item_feature`` it shares."""
    if spec.item_feature not in shared:
        raise ValueError(
            f"history feature {spec.name!r} shares the table of item id feature "
            f"{spec.item_feature!r}, which the item tower lacks"
        )
    table = shared[spec.item_feature]
    if spec.multi_interest:
        return INTEREST_EXTRACTORS[spec.extractor](table, spec)
    if spec.encoder in ("mean", "sum"):
        return PooledEncoder(table, spec.encoder)
    return HISTORY_ENCODERS[spec.encoder](table, spec)
