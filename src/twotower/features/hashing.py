"""Stable, vectorized hashing: the same value gives the same bucket in every process.

Python's ``hash`` is salted per process, so it cannot be used. Integers go through
the SplitMix64 finalizer; strings through a polynomial hash of their UTF-8 bytes
(computed for all strings at once with numpy), then the same finalizer.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)
_POLY = np.uint64(0x100000001B3)  # the FNV-1 64-bit prime, as polynomial base
_MAX, _MIN = str(np.iinfo(np.int64).max), str(np.iinfo(np.int64).min)


def splitmix64(x: np.ndarray, seed: int = 0) -> np.ndarray:
    """SplitMix64 finalizer of uint64 values (wrapping arithmetic), mixed with ``seed``."""
    with np.errstate(over="ignore"):
        z = x.astype(np.uint64) + _GOLDEN * np.uint64(seed + 1)
        z = (z ^ (z >> np.uint64(30))) * _MIX1
        z = (z ^ (z >> np.uint64(27))) * _MIX2
        return z ^ (z >> np.uint64(31))


def hash_values(values: pa.Array, seed: int = 0) -> np.ndarray:
    """uint64 hashes of an integer or string Arrow array (nulls hash as 0; mask them).

    Integers and their decimal strings hash alike (``7`` and ``"7"``), so an id
    column read as text in one file and as numbers in another lands in the same bucket.
    """
    if pa.types.is_integer(values.type):
        return splitmix64(pc.fill_null(values, 0).to_numpy().astype(np.int64).view(np.uint64), seed)
    strings = (
        pc.cast(values, pa.large_string()) if not pa.types.is_large_string(values.type) else values
    )
    return splitmix64(_hash_bytes(strings), seed)


def _hash_bytes(strings: pa.Array) -> np.ndarray:
    """Polynomial hash of each string's UTF-8 bytes, all strings at once."""
    strings = pc.fill_null(strings, "")
    numeric = _as_integers(strings)
    offsets = np.frombuffer(strings.buffers()[1], np.int64)[
        strings.offset : strings.offset + len(strings) + 1
    ]
    data = np.frombuffer(strings.buffers()[2], np.uint8)[offsets[0] : offsets[-1]].astype(np.uint64)
    lengths = np.diff(offsets)
    row = np.repeat(np.arange(len(strings)), lengths)
    from_end = (offsets[1:][row] - offsets[0]) - 1 - (np.arange(len(data)))
    with np.errstate(over="ignore"):
        powers = np.cumprod(
            np.r_[np.uint64(1), np.full(max(int(lengths.max(initial=0)) - 1, 0), _POLY)]
        )
        terms = (data + np.uint64(1)) * powers[from_end]
        sums = np.zeros(len(strings), np.uint64)
        np.add.at(sums, row, terms)
    hashed = sums ^ lengths.astype(np.uint64)
    return np.where(numeric.mask, hashed, numeric.data.view(np.uint64))


def _as_integers(strings: pa.Array) -> np.ma.MaskedArray:
    """Integer value of each string that is a plain decimal int64 (masked otherwise)."""
    # 19 digits may overflow int64; digit strings of one length compare like their numbers.
    overflow = pc.or_(
        pc.and_(pc.match_substring_regex(strings, r"^\d{19}$"), pc.greater(strings, _MAX)),
        pc.and_(pc.match_substring_regex(strings, r"^-\d{19}$"), pc.greater(strings, _MIN)),
    )
    is_int = pc.and_(pc.match_substring_regex(strings, r"^-?\d{1,19}$"), pc.invert(overflow))
    is_int = pc.fill_null(is_int, False)
    values = np.zeros(len(strings), np.int64)
    where = np.flatnonzero(is_int.to_numpy(zero_copy_only=False))
    if len(where):
        values[where] = pc.cast(pc.take(strings, pa.array(where)), pa.int64()).to_numpy()
    return np.ma.MaskedArray(values, mask=~is_int.to_numpy(zero_copy_only=False))


def hash_buckets(values: pa.Array, buckets: int, seed: int = 0) -> np.ndarray:
    """Bucket ids 1..buckets for each value, 0 for nulls."""
    ids = (hash_values(values, seed) % np.uint64(buckets)).astype(np.int64) + 1
    return np.where(pc.is_null(values).to_numpy(zero_copy_only=False), 0, ids)
