"""Numeric transforms: standardize, log1p then standardize, quantile buckets."""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from twotower.features.specs import DenseFeature
from twotower.features.transform import MISSING, FitContext, Transform


def as_float(values: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """(float64 values, missing mask); null, NaN and +-inf count as missing."""
    if values.type != pa.float64():
        values = pc.cast(values, pa.float64())
    x = values.to_numpy(zero_copy_only=False)
    x = np.asarray(x, dtype=np.float64)
    missing = ~np.isfinite(x)
    return np.where(missing, 0.0, x), missing


class DenseTransform(Transform):
    """A number -> (rows, 2) float32 [value, missing flag], or (rows,) bucket indices.

    For ``bucketize``, bucket 0 is missing and buckets 1..B follow the training
    quantiles, so a value equal to a boundary falls in the bucket above it.
    """

    spec: DenseFeature

    def __init__(self, spec: DenseFeature) -> None:
        super().__init__(spec)
        self.mean = 0.0
        self.std = 1.0
        self.boundaries = np.zeros(0)

    def prepare(self, x: np.ndarray) -> np.ndarray:
        """Observed values as the statistics see them (``log1p`` applied if chosen)."""
        return np.sign(x) * np.log1p(np.abs(x)) if self.spec.transform == "log1p" else x

    def fit(self, values: pa.Array, context: FitContext) -> None:
        self.fit_observed(self.observed(values))

    def observed(self, values: pa.Array) -> np.ndarray:
        """The values that are not missing, as the statistics see them (prepared)."""
        x, missing = as_float(values)
        return self.prepare(x[~missing])

    def fit_observed(self, observed: np.ndarray) -> None:
        """Fits from the prepared, non-missing values (or a sample of them)."""
        if self.spec.transform == "bucketize":
            if len(observed):
                q = np.arange(1, self.spec.num_buckets) / self.spec.num_buckets
                self.boundaries = np.unique(np.quantile(observed, q))
            return
        if len(observed):
            self.fit_moments(len(observed), float(observed.mean()), float(observed.std()))

    def fit_moments(self, count: int, mean: float, std: float) -> None:
        """Fits standardization from the prepared values' count, mean and std."""
        if count:
            self.mean = float(mean)
            self.std = float(std) if std > 0 else 1.0

    def transform(self, values: pa.Array) -> np.ndarray:
        x, missing = as_float(values)
        x = self.prepare(x)
        if self.spec.transform == "bucketize":
            buckets = np.searchsorted(self.boundaries, x, side="right") + 1
            return np.where(missing, MISSING, buckets).astype(np.int64)
        z = np.where(missing, 0.0, (x - self.mean) / self.std)
        return np.stack([z, missing], axis=1).astype(np.float32)

    @property
    def size(self) -> int:
        return len(self.boundaries) + 2 if self.spec.transform == "bucketize" else 2

    def state(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        return {"mean": self.mean, "std": self.std}, {"boundaries": self.boundaries}

    def load_state(self, meta: dict[str, Any], arrays: dict[str, np.ndarray]) -> None:
        self.mean, self.std = float(meta["mean"]), float(meta["std"])
        self.boundaries = arrays["boundaries"]
