"""Letter-trigram word hashing, as in the original DSSM (Huang et al. 2013).

``"Good food!"`` -> words ``good``, ``food`` -> ``#good#``, ``#food#`` -> trigrams
``#go goo ood od# #fo foo ood od#``, each hashed to a bucket. A bag of trigram
ids, sum-pooled through an embedding, equals DSSM's trigram-count vector times
its first weight matrix. Everything is vectorized over all words of all rows.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from twotower.features import ragged
from twotower.features.hashing import splitmix64
from twotower.features.specs import TextFeature
from twotower.features.transform import FitContext, Transform


def words(texts: pa.Array) -> tuple[pa.Array, np.ndarray]:
    """NFKC-normalized, lower-cased words of each text, split on anything not a letter or
    digit: (flat words, per-row counts)."""
    texts = pc.fill_null(pc.cast(texts, pa.string()), "")
    # NFKC first, so a decomposed "e" + accent is the same letter as a composed one.
    texts = pc.utf8_lower(pc.utf8_normalize(texts, "NFKC"))
    cleaned = pc.replace_substring_regex(texts, r"[^\p{L}\p{N}]+", " ")
    return ragged.list_parts(pc.utf8_split_whitespace(pc.utf8_trim_whitespace(cleaned)))


def trigram_codes(texts: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """Exact 63-bit codes of every letter trigram: (flat codes, per-row counts).

    A trigram's three Unicode code points (each < 2**21) are packed into one
    integer, so two different trigrams never share a code before hashing.
    """
    flat_words, words_per_row = words(texts)
    marked = pc.binary_join_element_wise("#", flat_words, "#", "")
    lengths = (
        pc.utf8_length(marked).to_numpy().astype(np.int64) if len(marked) else np.zeros(0, np.int64)
    )
    whole = pa.ListArray.from_arrays(pa.array([0, len(marked)], pa.int32()), marked)
    joined = pc.binary_join(whole, "")[0].as_py()  # one string: decoded once, not per word
    points = np.frombuffer(joined.encode("utf-32-le"), dtype=np.uint32).astype(np.uint64)
    per_word = np.maximum(lengths - 2, 0)
    word_start = np.cumsum(lengths) - lengths  # (words,), also for zero words
    start = np.repeat(word_start, per_word) + (
        np.arange(per_word.sum()) - np.repeat(np.cumsum(per_word) - per_word, per_word)
    )
    codes = (
        (points[start] << np.uint64(42)) | (points[start + 1] << np.uint64(21)) | points[start + 2]
    )
    word_row = np.repeat(np.arange(len(words_per_row)), words_per_row)
    per_row = np.bincount(word_row, weights=per_word, minlength=len(words_per_row)).astype(np.int64)
    return codes, per_row


class TextTransform(Transform):
    """Text -> (rows, L) int64 trigram bucket ids in 1..buckets, 0-padded (stateless)."""

    spec: TextFeature

    def fit(self, values: pa.Array, context: FitContext) -> None:
        """Nothing to learn: hashing needs no vocabulary."""

    def transform(self, values: pa.Array) -> np.ndarray:
        codes, per_row = trigram_codes(values)
        buckets = (splitmix64(codes) % np.uint64(self.spec.buckets)).astype(np.int64) + 1
        return ragged.pad(buckets, per_row, self.spec.max_len)

    @property
    def size(self) -> int:
        return self.spec.buckets + 1

    def state(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        return {}, {}

    def load_state(self, meta: dict[str, Any], arrays: dict[str, np.ndarray]) -> None:
        """Nothing to restore."""
