"""What each feature is, declared per feature in the config (one dataclass per kind).

Reserved indices, the same for every kind that produces indices:
    0: missing (also list padding);
    1: out of vocabulary (a value not seen, or seen too rarely, in training).
Hashed features use 0 for missing and 1..buckets for the hash buckets.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar, Literal

import pyarrow as pa

# a standardized or log1p dense feature's encoding: its value and a flag for missing
DENSE_VECTOR_WIDTH = 2

Pooling = Literal["mean", "sum"]
HistoryEncoder = Literal["mean", "sum", "attention", "transformer", "gru"]
InterestExtractor = Literal["self_attention", "routing"]


@dataclasses.dataclass(frozen=True)
class IdFeature:
    """A categorical id (a user id, an item id, an occupation) with its own embedding.

    Attributes:
        min_count: values seen fewer times in training map to out-of-vocabulary.
        max_size: keep at most this many most frequent values (None: all).
        hash_buckets: if > 0, hash values into this many buckets instead of a vocabulary,
            so the table does not grow with the id space.
        hash_functions: 1, or 2 to embed a value as the sum of the rows of two
            independent hashes into the one table: two values then share their whole
            embedding only if both hashes collide (about 1 / hash_buckets**2).
        dim: embedding width (used by the towers).
        dropout: in training, read each row's id as out of vocabulary with this
            probability (id dropout, ``twotower.features.dropout``), so the tower learns
            to place a row from its other features, as it must a value it never trained
            on (a new item, a new user), whose id reads so too. Evaluation, export and
            serving never drop. Needs a vocabulary (a hashed value has no
            out-of-vocabulary row: a new one reads its own bucket).
    """

    name: str
    column: str
    kind: Literal["id"] = "id"
    min_count: int = 1
    max_size: int | None = None
    hash_buckets: int = 0
    hash_functions: int = 1
    dim: int = 32
    dropout: float = 0.0

    def __post_init__(self) -> None:
        if self.hash_functions not in (1, 2):
            raise ValueError(f"{self.name}: hash_functions must be 1 or 2")
        if self.hash_functions == 2 and not self.hash_buckets:
            raise ValueError(f"{self.name}: hash_functions 2 needs hash_buckets > 0")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"{self.name}: dropout must be in [0, 1), got {self.dropout}")
        if self.dropout and self.hash_buckets:
            raise ValueError(
                f"{self.name}: dropout reads an id as out of vocabulary, and hashed ids "
                "(hash_buckets) have no vocabulary; drop one of the two"
            )


@dataclasses.dataclass(frozen=True)
class OneHotFeature:
    """A low-cardinality categorical as a one-hot vector (missing and unseen have a slot)."""

    name: str
    column: str
    kind: Literal["onehot"] = "onehot"
    min_count: int = 1


@dataclasses.dataclass(frozen=True)
class DenseFeature:
    """A number: standardized, ``log1p`` then standardized, or quantile-bucketized.

    ``log1p`` is applied as sign(x) * log1p(|x|), so it is defined for any x.
    NaN, infinities and nulls are missing: imputed (0 after standardizing, or the
    bucket 0) and flagged in a second column.

    Attributes:
        transform: ``standardize``, ``log1p`` or ``bucketize``.
        num_buckets: number of quantile buckets for ``bucketize``.
        dim: embedding width for ``bucketize``.
    """

    name: str
    column: str
    kind: Literal["dense"] = "dense"
    transform: Literal["standardize", "log1p", "bucketize"] = "standardize"
    num_buckets: int = 10
    dim: int = 8


@dataclasses.dataclass(frozen=True)
class MultiHotFeature:
    """A list of categories (``"Action|Comedy"`` or an Arrow list column), pooled.

    Attributes:
        separator: splits a string column into its list.
        max_len: at most this many values per row are kept (the first ones).
    """

    name: str
    column: str
    kind: Literal["multihot"] = "multihot"
    separator: str = "|"
    min_count: int = 1
    max_len: int = 32
    pooling: Pooling = "mean"
    dim: int = 16


@dataclasses.dataclass(frozen=True)
class HistoryFeature:
    """A query's most recent training items, sharing the item-id embedding table.

    Built from the training interactions only. ``column`` is the query key;
    ``item_feature`` names the item-side ``id`` feature whose vocabulary (and,
    in the towers, embedding table) is shared.

    Attributes:
        max_len: the most recent items kept.
        encoder: how the items become one vector (``twotower.towers.history``):
            ``mean`` / ``sum`` pool them; ``attention`` pools them with learned
            weights and recency (position) embeddings; ``transformer`` runs causal
            self-attention blocks (SASRec) and takes the most recent position's
            output; ``gru`` runs a GRU (GRU4Rec) from the oldest item and takes its
            last state.
        layers: transformer blocks, or GRU layers.
        heads: attention heads of each transformer block; must divide the item
            table's width.
        dropout: dropout inside the transformer and between GRU layers.
        interests: K > 1 makes the query tower multi-interest: the history becomes K
            interest vectors (``extractor``), each combined with the query's other
            features by the tower network, so the tower outputs K unit vectors and
            retrieval merges their results (``twotower.towers.history.interests``).
            1: one vector, through ``encoder``.
        extractor: how K interests are drawn from the history: ``self_attention``
            (ComiRec-SA: K attention heads over the items and their recency) or
            ``routing`` (MIND / ComiRec-DR: dynamic routing of the items into K
            capsules).
        routing_iterations: the routing's iterations.
        time_buckets: ``attention`` only, and only with timestamped interactions:
            > 0 adds to each item's attention key a learned embedding of its time gap
            to the history's most recent item, in this many buckets on a log2 scale
            of ``time_unit`` (bucket b: gaps in [2^b - 1, 2^(b+1) - 1) units; the last
            bucket takes everything longer). 0: no time gaps.
        time_unit: the gap buckets' unit, in the timestamps' own unit (3600: an
            hour of Unix seconds).
        item_dropout: in training, blank each history item with this probability
            (the encoders then read it as never there), so the tower does not lean on
            any one item; evaluation and serving see every item. Not in one-pass
            training, whose positions are the items themselves.
    """

    # the name ``encoder`` had while histories could only be pooled
    RENAMED: ClassVar[dict[str, str]] = {"pooling": "encoder"}

    name: str
    column: str
    item_feature: str
    kind: Literal["history"] = "history"
    max_len: int = 50
    encoder: HistoryEncoder = "mean"
    layers: int = 2
    heads: int = 1
    dropout: float = 0.1
    interests: int = 1
    extractor: InterestExtractor = "self_attention"
    routing_iterations: int = 3
    time_buckets: int = 0
    time_unit: float = 3600.0
    item_dropout: float = 0.0

    def __post_init__(self) -> None:
        if not 0.0 <= self.item_dropout < 1.0:
            raise ValueError(
                f"history feature {self.name!r}: item_dropout must be in [0, 1), "
                f"got {self.item_dropout}"
            )
        if self.max_len < 1 or self.layers < 1 or self.heads < 1:
            raise ValueError(
                f"history feature {self.name!r}: max_len, layers and heads must be >= 1"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"history feature {self.name!r}: dropout must be in [0, 1)")
        if self.interests < 1 or self.routing_iterations < 1:
            raise ValueError(
                f"history feature {self.name!r}: interests and routing_iterations must be "
                f">= 1, got {self.interests} and {self.routing_iterations}"
            )
        if self.interests > 1 and self.encoder != "mean":
            raise ValueError(
                f"history feature {self.name!r}: with interests {self.interests} the "
                f"{self.extractor!r} extractor encodes the history, so encoder "
                f"{self.encoder!r} would go unused; leave encoder at 'mean'"
            )

        if self.time_buckets < 0 or not self.time_unit > 0:
            raise ValueError(
                f"history feature {self.name!r}: time_buckets must be >= 0 and time_unit "
                f"> 0, got {self.time_buckets} and {self.time_unit}"
            )
        if self.time_buckets and (self.encoder != "attention" or self.multi_interest):
            raise ValueError(
                f"history feature {self.name!r}: time_buckets are read by the 'attention' "
                f"encoder only, not by {self.encoder!r}"
                + (f" with interests {self.interests}" if self.multi_interest else "")
            )

    @property
    def times_input(self) -> str:
        """The model input holding its items' timestamps (with ``time_buckets``)."""
        return f"{self.name}:times"

    @property
    def multi_interest(self) -> bool:
        """Whether this history gives the query tower several vectors."""
        return self.interests > 1


@dataclasses.dataclass(frozen=True)
class TextFeature:
    """Text by letter-trigram word hashing, as in DSSM: ``#good#`` -> #go, goo, ood, od#.

    Text is lower-cased and split into words on anything that is not a letter or a
    digit; each trigram is hashed into ``buckets`` (ids 1..buckets; 0 pads).

    Attributes:
        max_len: at most this many trigrams per row are kept (the first ones).
    """

    name: str
    column: str
    kind: Literal["text"] = "text"
    buckets: int = 30_000
    max_len: int = 64
    pooling: Pooling = "sum"
    dim: int = 64


@dataclasses.dataclass(frozen=True)
class VectorFeature:
    """A fixed-width vector computed elsewhere (a text or an image embedding): ``dim``
    numbers per row, an Arrow list or fixed_size_list column (Parquet).

    Every row is checked (``twotower.features.vector``): a row of another width, or
    holding a null, NaN or infinite number, is an error naming its row and column.

    Attributes:
        dim: the vector's width, which every row must have.
        normalize: ``l2`` (each row over its Euclidean norm; a row of zeros stays
            zeros), ``standardize`` (each dimension less its training mean, over its
            training standard deviation) or ``none`` (as it is).
        project: > 0: a learned linear map to this width in the tower; None: the
            (normalized) vector joins the tower's network input as it is.
        missing: what a missing (null) row is: ``error`` (refused, by row) or ``zero``
            (all zeros, after normalizing).
    """

    name: str
    column: str
    dim: int
    kind: Literal["vector"] = "vector"
    normalize: Literal["l2", "standardize", "none"] = "l2"
    project: int | None = None
    missing: Literal["error", "zero"] = "error"

    def __post_init__(self) -> None:
        if self.dim < 1 or (self.project is not None and self.project < 1):
            raise ValueError(
                f"vector feature {self.name!r}: dim and project must be >= 1, got "
                f"{self.dim} and {self.project}"
            )

    @property
    def arrow_type(self) -> pa.DataType:
        """The type its column is read as: ``dim`` float32 numbers per row."""
        return pa.list_(pa.float32(), self.dim)


FeatureSpec = (
    IdFeature
    | OneHotFeature
    | DenseFeature
    | MultiHotFeature
    | HistoryFeature
    | TextFeature
    | VectorFeature
)
SIDES = ("query", "item")


@dataclasses.dataclass(frozen=True)
class FeaturesConfig:
    """The features of each side; each is fitted on the training split only."""

    query: list[FeatureSpec] = dataclasses.field(default_factory=list)
    item: list[FeatureSpec] = dataclasses.field(default_factory=list)

    def __post_init__(self) -> None:
        for side in SIDES:
            names = [spec.name for spec in getattr(self, side)]
            duplicated = {n for n in names if names.count(n) > 1}
            if duplicated:
                raise ValueError(
                    f"features.{side}: duplicated feature name(s) {sorted(duplicated)}"
                )
        item_ids = {s.name: s.dim for s in self.item if isinstance(s, IdFeature)}
        double = {s.name for s in self.item if isinstance(s, IdFeature) and s.hash_functions > 1}
        for spec in self.query:
            if isinstance(spec, HistoryFeature) and spec.item_feature in double:
                raise ValueError(
                    f"features.query.{spec.name}: item_feature {spec.item_feature!r} uses two "
                    "hash functions; a history needs a one-index item id feature"
                )
            if isinstance(spec, HistoryFeature) and spec.item_feature not in item_ids:
                raise ValueError(
                    f"features.query.{spec.name}: item_feature {spec.item_feature!r} is not an "
                    f"item-side id feature (item id features: {sorted(item_ids)})"
                )
            width = item_ids.get(spec.item_feature, 0) if isinstance(spec, HistoryFeature) else 0
            if width and spec.encoder == "transformer" and width % spec.heads:
                raise ValueError(
                    f"features.query.{spec.name}: {spec.heads} heads do not divide the width "
                    f"{width} of item feature {spec.item_feature!r}"
                )
        multi = [s.name for s in self.query if isinstance(s, HistoryFeature) and s.multi_interest]
        if len(multi) > 1:
            raise ValueError(
                f"features.query: only one history feature may have interests > 1, got {multi}"
            )
        for spec in self.item:
            if isinstance(spec, HistoryFeature):
                raise ValueError(f"features.item.{spec.name}: history features are query-side")

    def encoded_widths(self, side: str) -> dict[str, int | None]:
        """Each feature's encoding width on a side, from the config alone, as the towers'
        encoders (``towers/encoders.py``) make it: an embedding's ``dim``, a history its
        item id table's, a standardized number ``DENSE_VECTOR_WIDTH``, a vector its
        ``project`` (else its ``dim``); None where the data decides it (a one-hot is as
        wide as its fitted vocabulary)."""
        item_ids = {s.name: s.dim for s in self.item if isinstance(s, IdFeature)}
        return {spec.name: _encoded_width(spec, item_ids) for spec in getattr(self, side)}

    def required_columns(self, side: str) -> dict[str, pa.DataType | None]:
        """The table columns a side's features read, with the type they must convert to
        (a vector's: ``dim`` numbers per row, so a row of another width is refused where
        the file is read, naming it)."""
        columns: dict[str, pa.DataType | None] = {}
        for spec in getattr(self, side):
            if isinstance(spec, DenseFeature):
                columns[spec.column] = pa.float64()
            elif isinstance(spec, VectorFeature):
                columns[spec.column] = spec.arrow_type
            else:
                columns[spec.column] = columns.get(spec.column)
        return columns


def _encoded_width(spec: FeatureSpec, item_ids: dict[str, int]) -> int | None:
    if isinstance(spec, OneHotFeature):
        return None
    if isinstance(spec, HistoryFeature):
        return item_ids.get(spec.item_feature)
    if isinstance(spec, DenseFeature) and spec.transform != "bucketize":
        return DENSE_VECTOR_WIDTH
    if isinstance(spec, VectorFeature) and spec.project is not None:
        return spec.project
    return spec.dim
