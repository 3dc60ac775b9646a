"""Vector features (embeddings computed elsewhere): read from any list column, checked
row by row, normalized as numpy does it, fitted on training rows only, saved without
pickle, kept on a warm start, fitted alike from a stream, refused one request row at a
time."""

from __future__ import annotations

import functools
import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from twotower.config_io import from_dict
from twotower.data.config import TableSpec
from twotower.data.dataset import Dataset
from twotower.data.tables import read_table
from twotower.errors import DataError
from twotower.features.contract import input_contract
from twotower.features.pipeline import FeaturePipeline
from twotower.features.rows import rows_table
from twotower.features.specs import FeaturesConfig, IdFeature, VectorFeature
from twotower.features.streaming import StreamingFit
from twotower.features.transform import FitContext
from twotower.features.vector import VectorTransform

NAN, INF = float("nan"), float("inf")
RNG = np.random.default_rng(0)
TRAIN = RNG.normal(3.0, [1.0, 2.0, 0.5, 4.0], size=(40, 4))  # dimensions of unlike scales
NEW = RNG.normal(size=(7, 4))


def _fitted(normalize: str = "l2", missing: str = "error", values=TRAIN) -> VectorTransform:
    transform = VectorTransform(
        VectorFeature("emb", "e", dim=4, normalize=normalize, missing=missing)
    )
    transform.fit(pa.array(values.tolist()), FitContext())
    return transform


COLUMN_TYPES = {
    "list of doubles": lambda x: pa.array(x.tolist(), pa.list_(pa.float64())),
    "fixed_size_list of floats": lambda x: pa.FixedSizeListArray.from_arrays(
        pa.array(x.astype(np.float32).ravel()), x.shape[1]
    ),
    "large_list of doubles": lambda x: pa.array(x.tolist(), pa.large_list(pa.float64())),
    "chunked": lambda x: pa.chunked_array([x[:3].tolist(), x[3:].tolist()]),
    "sliced": lambda x: pa.array([[9.0] * 4, *x.tolist()]).slice(1),
}


@pytest.mark.parametrize("column", COLUMN_TYPES)
@pytest.mark.parametrize("normalize", ["l2", "standardize", "none"])
def test_each_normalization_matches_numpy(normalize, column):
    transform = _fitted(normalize)
    values = COLUMN_TYPES[column](NEW)
    x = NEW.astype(np.float32).astype(np.float64) if "float" in column else NEW
    expected = {
        "l2": x / np.linalg.norm(x, axis=1, keepdims=True),
        "standardize": (x - TRAIN.mean(axis=0)) / TRAIN.std(axis=0),
        "none": x,
    }[normalize]
    out = transform.transform(values)
    assert out.dtype == np.float32 and out.shape == (7, 4)
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-6)


def test_integers_read_as_numbers_and_zeros_stay_zeros_under_l2():
    out = _fitted("l2").transform(pa.array([[3, 0, 4, 0], [0, 0, 0, 0]], pa.list_(pa.int64())))
    np.testing.assert_allclose(out, [[0.6, 0, 0.8, 0], [0, 0, 0, 0]])


def test_a_dimension_that_never_varies_keeps_std_one():
    constant = TRAIN.copy()
    constant[:, 2] = 5.0
    transform = _fitted("standardize", values=constant)
    assert transform.std[2] == 1.0 and transform.mean[2] == 5.0
    out = transform.transform(pa.array([[0.0, 0.0, 7.0, 0.0]]))
    assert out[0, 2] == pytest.approx(2.0)


def test_missing_zero_gives_zeros_and_leaves_missing_rows_out_of_the_statistics():
    with_missing = pa.array([*TRAIN.tolist(), None, None])
    transform = VectorTransform(
        VectorFeature("emb", "e", dim=4, normalize="standardize", missing="zero")
    )
    transform.fit(with_missing, FitContext())
    np.testing.assert_allclose(transform.mean, TRAIN.mean(axis=0))
    out = transform.transform(pa.array([None, NEW[0].tolist(), None]))
    assert not out[[0, 2]].any()
    np.testing.assert_allclose(out[1], (NEW[0] - TRAIN.mean(0)) / TRAIN.std(0), rtol=1e-5)
    assert not _fitted(missing="zero").transform(pa.nulls(2)).any()  # a column of nulls


BAD_ROWS = {
    "a row of another width": ([1.0, 2.0, 3.0], "row 2 (0-based) holds 3 numbers, not dim 4"),
    "a NaN": ([1.0, NAN, 3.0, 4.0], "row 2 (0-based) holds a null, NaN or infinite number"),
    "an infinity": ([1.0, 2.0, -INF, 4.0], "row 2 (0-based) holds a null, NaN or infinite"),
    "a null number": ([1.0, None, 3.0, 4.0], "row 2 (0-based) holds a null, NaN or infinite"),
    "a missing row": (None, "row 2 (0-based) is missing (null); missing: zero reads"),
}


@pytest.mark.parametrize("case", BAD_ROWS)
def test_a_refused_row_names_the_feature_its_column_and_the_row(case):
    bad, message = BAD_ROWS[case]
    rows = pa.array([NEW[0].tolist(), NEW[1].tolist(), bad, [1.0, 2.0]])  # 3 is bad too
    where = "vector feature 'emb' (column 'e'): "
    with pytest.raises(DataError, match="^" + re.escape(where + message)):
        _fitted().transform(rows)
    with pytest.raises(DataError, match="row 2 "):
        _fitted().fit(rows, FitContext())
    zero = _fitted(missing="zero")
    if case == "a missing row":
        assert not zero.transform(rows.slice(0, 3))[2].any()
    else:
        with pytest.raises(DataError, match="row 2 "):
            zero.transform(rows)


def test_a_column_of_other_values_is_refused_by_name():
    with pytest.raises(DataError, match=r"column 'e'\): holds list<item: string>, not lists"):
        _fitted().transform(pa.array([["a", "b", "c", "d"]]))
    with pytest.raises(DataError, match="holds double, not lists of numbers"):
        _fitted().transform(pa.array([1.0]))


ITEMS = pa.table(
    {
        "item": [10, 11, 12, 13, 14],
        # item 13 has no training interaction; item 14 holds a NaN (table row 4)
        "emb": [[1.0, 0.0], [0.0, 2.0], [3.0, 3.0], [NAN, NAN], [1.0, NAN]],
    }
)
LOG = pa.table({"query_id": [1, 1, 2, 2, 3], "item_id": [10, 11, 12, 14, 11]})
VECTOR_FEATURES = FeaturesConfig(
    query=[IdFeature("user", "query_id")],
    item=[VectorFeature("emb", "emb", dim=2, normalize="standardize")],
)


def test_fitting_names_the_row_of_the_side_table_not_of_its_training_rows():
    dataset = Dataset.from_tables(LOG, None, ITEMS, item_key="item")
    with pytest.raises(DataError, match=r"row 4 \(0-based\) holds a null, NaN"):
        FeaturePipeline.fit(VECTOR_FEATURES, dataset, dataset.interactions)


def _fitted_pipeline() -> tuple[FeaturePipeline, Dataset]:
    items = ITEMS.set_column(
        1, "emb", pa.array([[1.0, 0.0], [0.0, 2.0], [3.0, 3.0], [50, 50], [1.0, 4.0]])
    )
    dataset = Dataset.from_tables(LOG, None, items, item_key="item")
    return FeaturePipeline.fit(VECTOR_FEATURES, dataset, dataset.interactions), dataset


def test_statistics_come_from_training_rows_and_save_as_plain_arrays(tmp_path: Path):
    pipeline, dataset = _fitted_pipeline()
    trained = np.array([[1.0, 0.0], [0.0, 2.0], [3.0, 3.0], [1.0, 4.0]])  # not item 13
    transform = pipeline.transforms["item"]["emb"]
    np.testing.assert_allclose(transform.mean, trained.mean(axis=0))
    np.testing.assert_allclose(transform.std, trained.std(axis=0))
    pipeline.save(tmp_path)
    with np.load(tmp_path / "features.npz", allow_pickle=False) as arrays:
        np.testing.assert_array_equal(arrays["item.emb.mean"], trained.mean(axis=0))
        np.testing.assert_array_equal(arrays["item.emb.std"], trained.std(axis=0))
    loaded = FeaturePipeline.load(tmp_path)
    before, after = (p.transform("item", dataset.items)["emb"] for p in (pipeline, loaded))
    assert before.shape == (5, 2) and before.equal(after)


def test_a_warm_start_keeps_the_statistics():
    pipeline, _ = _fitted_pipeline()
    shifted = ITEMS.set_column(
        1, "emb", pa.array([[100.0, -5.0], [7.0, 8.0], [0.0, 1.0]] + [[2.0, 2.0]] * 2)
    )
    new = Dataset.from_tables(LOG, None, shifted, item_key="item")
    grown = pipeline.extend(VECTOR_FEATURES, new, new.interactions)
    old, kept = pipeline.transforms["item"]["emb"], grown.transforms["item"]["emb"]
    assert np.array_equal(old.mean, kept.mean) and np.array_equal(old.std, kept.std)


def test_a_streamed_fit_equals_the_whole_table_fit():
    rows = RNG.normal(2.0, 3.0, size=(1000, 4))
    whole = pa.table({"e": pa.array(rows.tolist())})
    spec = VectorFeature("emb", "e", dim=4, normalize="standardize")
    reference = VectorTransform(spec)
    reference.fit(whole.column("e"), FitContext())
    streamed = {"emb": VectorTransform(spec)}
    fit = StreamingFit(streamed)
    for start in range(0, 1000, 333):
        fit.update(whole.slice(start, 333))
    assert fit.finish() == {"emb": True}
    np.testing.assert_allclose(streamed["emb"].mean, reference.mean, rtol=1e-12)
    np.testing.assert_allclose(streamed["emb"].std, reference.std, rtol=1e-10)


def test_request_rows_are_refused_one_by_one():
    pipeline, dataset = _fitted_pipeline()
    rows = [
        {"item": 1, "emb": [1.0, 2.0]},
        {"item": 2, "emb": [1.0, 2.0, 3.0]},
        {"item": 3, "emb": [NAN, 2.0]},
        {"item": 4},
        {"item": 5, "emb": [0, 5]},
    ]
    check = functools.partial(pipeline.row_errors, "item")
    table, errors = rows_table(rows, ["item", "emb"], dataset.items.schema, check)
    assert table.column("item").to_pylist() == [1, 5]
    assert sorted(errors) == [1, 2, 3]
    assert (
        str(errors[1])
        == "vector feature 'emb' (column 'emb'): the vector holds 3 numbers, not dim 2"
    )
    assert "holds a null, NaN or infinite number" in str(errors[2])
    assert "the vector is missing (null)" in str(errors[3])
    assert pipeline.transform("item", table)["emb"].shape == (2, 2)


def test_the_config_reads_a_vector_and_sizes_it():
    features = from_dict(
        FeaturesConfig,
        {
            "query": [{"name": "user", "kind": "id", "column": "u"}],
            "item": [
                {
                    "name": "image",
                    "kind": "vector",
                    "column": "image_emb",
                    "dim": 512,
                    "project": 64,
                },
                {"name": "text", "kind": "vector", "column": "text_emb", "dim": 384},
            ],
        },
        where="features",
    )
    image, text = features.item
    assert (image.normalize, image.missing, text.project) == ("l2", "error", None)
    assert features.encoded_widths("item") == {"image": 64, "text": 384}
    assert features.required_columns("item")["image_emb"] == pa.list_(pa.float32(), 512)
    with pytest.raises(ValueError, match="dim and project must be >= 1"):
        VectorFeature("x", "x", dim=0)
    with pytest.raises(ValueError, match="dim and project must be >= 1"):
        VectorFeature("x", "x", dim=8, project=0)


def test_a_parquet_row_of_another_width_is_refused_naming_the_file_row_and_column(tmp_path):
    path = tmp_path / "items.parquet"
    rows = [[0.5] * 512, [0.5] * 512, [0.25] * 511]
    pq.write_table(pa.table({"i": [1, 2, 3], "image_emb": rows}), path)
    types = FeaturesConfig(item=[VectorFeature("image", "image_emb", dim=512)]).required_columns(
        "item"
    )
    with pytest.raises(DataError) as err:
        read_table(TableSpec(path), types)
    assert str(err.value) == (
        f"{path}: row 2 (0-based), column 'image_emb': cannot convert a list of 511 values "
        "[0.25, 0.25, 0.25, ...] to fixed_size_list<item: float>[512]"
    )


def test_a_vector_in_a_csv_file_is_refused(tmp_path):
    path = tmp_path / "items.csv"
    path.write_text('i,emb\n1,"1,2"\n')
    types = FeaturesConfig(item=[VectorFeature("emb", "emb", dim=2)]).required_columns("item")
    with pytest.raises(
        DataError, match="column 'emb' must hold lists .* write the table as Parquet"
    ):
        read_table(TableSpec(path), types)


def test_the_contract_names_the_vector_input_its_dtype_and_shape():
    pipeline, _ = _fitted_pipeline()
    (entry,) = input_contract(pipeline, "item")
    assert {k: entry[k] for k in ("name", "dtype", "shape", "column", "kind")} == {
        "name": "emb",
        "dtype": "float32",
        "shape": ["batch", 2],
        "column": "emb",
        "kind": "vector",
    }
    assert "less the fitted mean, over the fitted standard deviation" in entry["encoding"]
