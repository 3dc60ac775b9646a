"""The model inputs of a side, described for a runtime that is not this package.

A tower exported on its own (``twotower export --onnx``) takes the tensors that
``FeaturePipeline.transform`` makes of raw rows. Whoever calls it elsewhere must make
the same tensors from the same raw fields; ``input_contract`` says, per input, its
name, dtype and shape, the raw column it is read from and how, and the fitted state
(in ``features/``) the mapping needs.
"""

from __future__ import annotations

from typing import Any

from twotower.features.pipeline import FeaturePipeline
from twotower.features.specs import (
    DenseFeature,
    HistoryFeature,
    IdFeature,
    MultiHotFeature,
    OneHotFeature,
    TextFeature,
    VectorFeature,
)

BATCH = "batch"  # the name of every input's first axis


def input_contract(pipeline: FeaturePipeline, side: str) -> list[dict[str, Any]]:
    """Each model input of ``side``, in ``transform``'s order.

    Returns:
        One dict per input: ``name``, ``dtype`` (numpy's name), ``shape`` (axis sizes,
        ``"batch"`` or a ``"<feature>_length"`` for the axes that vary), ``feature``,
        ``kind``, ``column`` (the raw column) and ``encoding`` (how the column's
        values become the tensor's).
    """
    out = []
    for name, transform in pipeline.transforms[side].items():
        spec = transform.spec
        column = pipeline.input_column(side, name)
        entry = {"name": name, "feature": name, "kind": spec.kind, "column": column}
        out.append({**entry, **_encoding(spec, transform.size)})
        if isinstance(spec, HistoryFeature) and spec.time_buckets:
            out.append(
                {
                    **entry,
                    "name": spec.times_input,
                    "dtype": "float64",
                    "shape": [BATCH, f"{name}_length"],
                    "encoding": f"the timestamps of {name!r}'s items, in the same places, in "
                    "the interaction log's units; 0 where there is no item",
                }
            )
    return out


def _encoding(spec: Any, size: int) -> dict[str, Any]:
    """dtype, shape and encoding of one feature's input."""
    codes = "0 for a missing value, 1 for a value out of the vocabulary, 2.. in the order"
    vocabulary = f"{codes} of the fitted vocabulary in features/ ({size} rows in all)"
    length = [BATCH, f"{spec.name}_length"]
    if isinstance(spec, IdFeature):
        if spec.hash_buckets:
            shape = [BATCH] if spec.hash_functions == 1 else [BATCH, spec.hash_functions]
            how = (
                f"1 + the value's seeded 64-bit hash (twotower.features.hashing.hash_values, "
                f"seeds 0..{spec.hash_functions - 1}) mod {spec.hash_buckets}; 0 for a "
                "missing value"
            )
            return {"dtype": "int64", "shape": shape, "encoding": how}
        return {"dtype": "int64", "shape": [BATCH], "encoding": vocabulary}
    if isinstance(spec, OneHotFeature):
        how = f"one-hot of the value's vocabulary index ({vocabulary})"
        return {"dtype": "float32", "shape": [BATCH, size], "encoding": how}
    if isinstance(spec, DenseFeature):
        if spec.transform == "bucketize":
            how = "0 for a missing value, else 1 + the number of fitted boundaries <= the value"
            return {"dtype": "int64", "shape": [BATCH], "encoding": how}
        prepared = "log1p(|x|) * sign(x)" if spec.transform == "log1p" else "x"
        how = (
            f"[({prepared} - mean) / std, 0] with the fitted mean and std; [0, 1] for a "
            "missing value"
        )
        return {"dtype": "float32", "shape": [BATCH, 2], "encoding": how}
    if isinstance(spec, MultiHotFeature):
        how = f"each category's index ({vocabulary}), 0-padded; at most {spec.max_len}"
        return {"dtype": "int64", "shape": length, "encoding": how}
    if isinstance(spec, TextFeature):
        how = (
            f"1 + splitmix64(code) mod {spec.buckets} of each letter trigram of the text's "
            "NFKC-normalized, lower-cased words marked #word# (code: the trigram's three "
            "code points, 21 bits each; twotower.features.text), 0-padded; at most "
            f"{spec.max_len}"
        )
        return {"dtype": "int64", "shape": length, "encoding": how}
    if isinstance(spec, VectorFeature):
        return {"dtype": "float32", "shape": [BATCH, spec.dim], "encoding": _vector(spec)}
    if isinstance(spec, HistoryFeature):
        how = (
            f"the user's recent items, most recent first (its state's recent entries, or "
            f"a request's history reversed), each as its index in item feature "
            f"{spec.item_feature!r} ({codes} of its vocabulary: the code of the item's "
            f"value in that feature's column), 0-padded; at most {spec.max_len}"
        )
        return {"dtype": "int64", "shape": length, "encoding": how}
    raise TypeError(f"no input contract for feature kind {spec.kind!r}")


def _vector(spec: VectorFeature) -> str:
    """How a vector feature's row becomes its input."""
    how = {
        "l2": "divided by its Euclidean norm (a row of zeros stays zeros)",
        "standardize": "less the fitted mean, over the fitted standard deviation, each "
        "dimension its own (the feature's mean and std arrays in features/features.npz)",
        "none": "as it is",
    }[spec.normalize]
    missing = "all zeros for a missing row" if spec.missing == "zero" else "no row missing"
    return (
        f"the row's {spec.dim} numbers (float32), {how}; {missing}; a row of another "
        "width or with a NaN or infinite number is refused"
    )
