"""Categorical transforms: ids (vocabulary or hashing), one-hot, and multi-hot lists."""

from __future__ import annotations

import functools
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from twotower.errors import DataError
from twotower.features import ragged
from twotower.features.hashing import hash_buckets
from twotower.features.specs import IdFeature, MultiHotFeature, OneHotFeature
from twotower.features.transform import (
    MISSING,
    OOV,
    RESERVED,
    FitContext,
    Transform,
    from_numpy_array,
    to_numpy_array,
)

FEW_VALUES = 64  # a lookup of at most this many values binary-searches, whatever the size


class Vocabulary:
    """Values seen at least ``min_count`` times, most frequent first (ties by value).

    ``lookup`` maps null to 0 (missing), a value not kept to 1 (out of vocabulary),
    and the i-th kept value to i + 2.
    """

    def __init__(self, values: pa.Array | None = None) -> None:
        self.values = values if values is not None else pa.array([], pa.string())

    @classmethod
    def fit(
        cls, values: pa.Array, weights: np.ndarray | None, min_count: int, max_size: int | None
    ) -> Vocabulary:
        values = _flat(values)
        present = pc.invert(pc.is_null(values))
        values = values.filter(present)
        if weights is None:
            counts = pc.value_counts(values)
            uniques, freq = counts.field("values"), counts.field("counts").to_numpy()
        else:
            encoded = pc.dictionary_encode(values)
            row_weights = np.asarray(weights)[present.to_numpy(zero_copy_only=False)]
            freq = np.bincount(
                encoded.indices.to_numpy(), weights=row_weights, minlength=len(encoded.dictionary)
            )
            uniques = encoded.dictionary
        keep = np.flatnonzero(freq >= min_count)
        order = pc.sort_indices(
            pa.table({"f": pa.array(-freq[keep]), "v": pc.take(uniques, pa.array(keep))}),
            sort_keys=[("f", "ascending"), ("v", "ascending")],
        )
        ordered = pc.take(pc.take(uniques, pa.array(keep)), order)
        return cls(ordered[:max_size] if max_size is not None else ordered)

    def __len__(self) -> int:
        return len(self.values)

    def grow(self, fresh: Vocabulary, max_size: int | None = None) -> Vocabulary:
        """This vocabulary with the values of ``fresh`` (a fit on new data) it lacks
        appended, in ``fresh``'s order (most frequent first): every value keeps its index.

        Args:
            fresh: the vocabulary fitted on the new data.
            max_size: at most this many values in all; the new values past it are left
                out (they read as out of vocabulary), the old ones never are.

        Raises:
            DataError: ``fresh``'s values cannot be read as this vocabulary's type.
        """
        if len(self) == 0:
            return fresh
        try:
            values = pc.cast(fresh.values, self.values.type)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
            raise DataError(
                f"values of type {fresh.values.type} cannot join a vocabulary of {self.values.type}"
            ) from None
        new = values.filter(pc.invert(pc.is_in(values, value_set=self.values)))
        room = len(new) if max_size is None else max(max_size - len(self), 0)
        return Vocabulary(pa.concat_arrays([self.values, new[:room]]))

    def lookup(self, values: pa.Array) -> np.ndarray:
        """(rows,) int64 indices of ``values`` (0 missing, 1 unseen, 2.. the vocabulary).

        A few values (serving: one request's rows), or values far fewer than a large
        vocabulary's, are binary-searched in a sorted copy made once, instead of hashing
        the whole vocabulary again for every call as ``index_in`` does; at most
        ``FEW_VALUES`` of them are read as Python values (``_lookup_few``), which spares
        a lone request the array calls' fixed costs.
        """
        values, vocabulary = _comparable(values, self.values)
        if (
            len(values) <= FEW_VALUES
            and vocabulary is self.values
            and _reads_as_python(values.type)
        ):
            found = self._lookup_few(values.to_pylist())
            if found is not None:
                return found
        if values.null_count:
            missing = pc.is_null(values).to_numpy(zero_copy_only=False)
        else:
            missing = np.zeros(len(values), dtype=bool)
        if (
            vocabulary is self.values
            and (len(values) <= FEW_VALUES or len(values) * 64 < len(vocabulary))
            and self._sorted is not None
            and not _has_trailing_nul(values)
        ):
            positions = self._sorted.find(_as_keys(values, self._sorted.integer))
            codes = np.where(positions >= 0, positions + RESERVED, OOV)
            return np.where(missing, MISSING, codes).astype(np.int64)
        position = pc.index_in(values, value_set=vocabulary)
        codes = pc.fill_null(pc.add(position, RESERVED), OOV).to_numpy().astype(np.int64)
        return np.where(missing, MISSING, codes)

    def _lookup_few(self, values: list[Any]) -> np.ndarray | None:
        """``lookup`` of a few values (one request's rows) as Python values: the same
        codes, without the array path's per-call pyarrow calls (a lone request pays
        each call's fixed cost for a single value). None where that path must answer:
        no sorted copy, or a text ending in NUL (which numpy's text drops)."""
        if self._sorted is None:
            return None
        integer = self._sorted.integer
        if not integer and any(v is not None and v.endswith("\x00") for v in values):
            return None
        blank = 0 if integer else ""
        keys = np.array([blank if v is None else v for v in values], np.int64 if integer else str)
        positions = self._sorted.find(keys).tolist()
        codes = [
            MISSING if v is None else (OOV if p < 0 else p + RESERVED)
            for v, p in zip(values, positions, strict=True)
        ]
        return np.array(codes, np.int64)

    @functools.cached_property
    def _sorted(self) -> SortedKeys | None:
        """The vocabulary, sorted for binary search; None for other types."""
        kind = self.values.type
        if not (pa.types.is_integer(kind) or pa.types.is_string(kind)) or len(self.values) == 0:
            return None
        if _has_trailing_nul(self.values):  # numpy text drops trailing NULs
            return None
        return SortedKeys(_as_keys(self.values, pa.types.is_integer(kind)))


class SortedKeys:
    """Unique keys (int64 or text) sorted once, then found by binary search.

    The lookup for a few values against many keys: time proportional to the values
    (times log of the keys), where hashing the keys would cost their number per call.
    """

    def __init__(self, keys: np.ndarray) -> None:
        self.integer = keys.dtype.kind == "i"
        self._order = np.argsort(keys, kind="stable")
        self._sorted = keys[self._order]

    def find(self, wanted: np.ndarray) -> np.ndarray:
        """(rows,) int64 position of each wanted value among the keys; -1 where absent."""
        if len(self._sorted) == 0:
            return np.full(len(wanted), -1, dtype=np.int64)
        where = np.minimum(np.searchsorted(self._sorted, wanted), len(self._sorted) - 1)
        return np.where(self._sorted[where] == wanted, self._order[where], -1).astype(np.int64)


def _reads_as_python(kind: pa.DataType) -> bool:
    """Whether ``_lookup_few`` reads values of ``kind`` as the array path does: text,
    or signed integers (Python ints that fit int64 keys without wrapping)."""
    return pa.types.is_string(kind) or (
        pa.types.is_integer(kind) and pa.types.is_signed_integer(kind)
    )


def _has_trailing_nul(values: pa.Array) -> bool:
    if not pa.types.is_string(values.type):
        return False
    return bool(pc.any(pc.ends_with(values, "\x00")).as_py())


def _as_keys(values: pa.Array, integer: bool) -> np.ndarray:
    """Integer or text values as a numpy array for ``searchsorted`` (nulls as 0 / "")."""
    if integer:
        return pc.fill_null(values, 0).to_numpy().astype(np.int64)
    return pc.fill_null(values, "").to_numpy(zero_copy_only=False).astype(str)


def _comparable(values: pa.Array, vocabulary: pa.Array) -> tuple[pa.Array, pa.Array]:
    """Same-typed arrays for lookup; text vs numbers are compared as text."""
    if isinstance(values, pa.ChunkedArray):
        values = values.combine_chunks()
    if values.type == vocabulary.type or len(vocabulary) == 0:
        return values, vocabulary
    try:
        return pc.cast(values, vocabulary.type), vocabulary
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        return pc.cast(values, pa.string()), pc.cast(vocabulary, pa.string())


class _VocabularyTransform(Transform):
    """A transform whose whole state is one ``Vocabulary``; ``grow`` appends the new
    values (an embedding table gains their rows)."""

    def __init__(self, spec: Any) -> None:
        super().__init__(spec)
        self.vocabulary = Vocabulary()

    def grow(self, fresh: Transform) -> Transform:
        assert isinstance(fresh, _VocabularyTransform)
        grown = type(fresh)(fresh.spec)
        try:
            grown.vocabulary = self.vocabulary.grow(
                fresh.vocabulary, getattr(fresh.spec, "max_size", None)
            )
        except DataError as err:
            raise DataError(f"feature {fresh.spec.name!r}: {err}") from None
        return grown

    @property
    def size(self) -> int:
        return len(self.vocabulary) + RESERVED

    def state(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        return {}, {"vocabulary": to_numpy_array(self.vocabulary.values)}

    def load_state(self, meta: dict[str, Any], arrays: dict[str, np.ndarray]) -> None:
        self.vocabulary = Vocabulary(from_numpy_array(arrays["vocabulary"]))


class IdTransform(_VocabularyTransform):
    """An id -> (rows,) int64 embedding index (vocabulary with min_count, or hash buckets)."""

    spec: IdFeature

    def fit(self, values: pa.Array, context: FitContext) -> None:
        if not self.spec.hash_buckets:
            self.vocabulary = Vocabulary.fit(
                values, context.weights, self.spec.min_count, self.spec.max_size
            )

    def transform(self, values: pa.Array) -> np.ndarray:
        """(rows,) int64 indices; (rows, 2) with two hash functions (seeds 0 and 1)."""
        if self.spec.hash_buckets:
            values = _flat(values)
            seeds = range(self.spec.hash_functions)
            buckets = [hash_buckets(values, self.spec.hash_buckets, seed) for seed in seeds]
            return buckets[0] if len(buckets) == 1 else np.stack(buckets, axis=1)
        return self.vocabulary.lookup(values)

    @property
    def size(self) -> int:
        return self.spec.hash_buckets + 1 if self.spec.hash_buckets else super().size


class OneHotTransform(_VocabularyTransform):
    """A low-cardinality categorical -> a (rows, size) float32 one-hot matrix."""

    spec: OneHotFeature

    def fit(self, values: pa.Array, context: FitContext) -> None:
        self.vocabulary = Vocabulary.fit(values, context.weights, self.spec.min_count, None)

    def grow(self, fresh: Transform) -> Transform:
        """Kept, not grown: the one-hot's width is an input width of the tower's network,
        so a category new to it reads as out of vocabulary, as it did before."""
        return Transform.grow(self, fresh)

    def transform(self, values: pa.Array) -> np.ndarray:
        return np.eye(self.size, dtype=np.float32)[self.vocabulary.lookup(values)]


class MultiHotTransform(_VocabularyTransform):
    """A list of categories -> (rows, L) int64 vocabulary indices, 0-padded."""

    spec: MultiHotFeature

    def _tokens(self, values: pa.Array) -> tuple[pa.Array, np.ndarray]:
        values = _flat(values)
        if pa.types.is_string(values.type) or pa.types.is_large_string(values.type):
            values = pc.split_pattern(values, self.spec.separator)
        elif not (pa.types.is_list(values.type) or pa.types.is_large_list(values.type)):
            values = pc.split_pattern(pc.cast(values, pa.string()), self.spec.separator)
        # Drop empty tokens ("" from an empty string, "a||b") by rebuilding the lists.
        tokens, lengths = ragged.list_parts(values)
        tokens = pc.utf8_trim_whitespace(pc.cast(tokens, pa.string()))
        nonempty = pc.fill_null(pc.not_equal(tokens, ""), False).to_numpy(zero_copy_only=False)
        row = np.repeat(np.arange(len(lengths)), lengths)
        lengths = np.bincount(row[nonempty], minlength=len(lengths))
        return tokens.filter(pa.array(nonempty)), lengths

    def tokens(self, values: pa.Array) -> pa.Array:
        """Every row's categories, flattened (what the vocabulary counts)."""
        return self._tokens(values)[0]

    def fit(self, values: pa.Array, context: FitContext) -> None:
        tokens, lengths = self._tokens(values)
        weights = None if context.weights is None else np.repeat(context.weights, lengths)
        self.vocabulary = Vocabulary.fit(tokens, weights, self.spec.min_count, None)

    def transform(self, values: pa.Array) -> np.ndarray:
        tokens, lengths = self._tokens(values)
        return ragged.pad(self.vocabulary.lookup(tokens), lengths, self.spec.max_len)


def _flat(values: pa.Array | pa.ChunkedArray) -> pa.Array:
    return values.combine_chunks() if isinstance(values, pa.ChunkedArray) else values
