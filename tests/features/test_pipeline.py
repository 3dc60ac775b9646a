"""The feature pipeline: fit on training data, transform, save and load."""

from __future__ import annotations

import dataclasses
import json
import math
from importlib.resources import files
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from twotower.config import load_config
from twotower.data.config import SplitConfig
from twotower.data.dataset import ITEM_IDX, Dataset
from twotower.data.load import load_dataset
from twotower.data.splits import split_interactions
from twotower.errors import DataError
from twotower.features.pipeline import ARRAYS_FILE, STATE_FILE, FeaturePipeline
from twotower.features.specs import (
    DenseFeature,
    FeaturesConfig,
    IdFeature,
    MultiHotFeature,
    OneHotFeature,
)
from twotower.features.transform import MISSING, OOV

SEGMENTS = ["a", "b", "c", "d"]
CATEGORIES = [f"c{i}" for i in range(5)]
GENRES = [f"g{i:02d}" for i in range(18)]


@dataclasses.dataclass(frozen=True)
class Demo:
    dataset: Dataset
    train: pa.Table
    pipeline: FeaturePipeline
    features: FeaturesConfig

    def table(self, side: str) -> pa.Table:
        return self.dataset.queries if side == "query" else self.dataset.items


@pytest.fixture(scope="module")
def demo() -> Demo:
    config = load_config(files("twotower") / "recipes" / "demo.yaml")
    dataset = load_dataset(config.data)
    train = split_interactions(dataset, config.split).train
    return Demo(
        dataset, train, FeaturePipeline.fit(config.features, dataset, train), config.features
    )


def _check_outputs(demo: Demo, side: str, out: dict[str, torch.Tensor], rows: int) -> None:
    """Each feature's tensor has the documented dtype, shape and index range."""
    sizes = demo.pipeline.sizes(side)
    assert list(out) == [spec.name for spec in getattr(demo.features, side)]
    for spec in getattr(demo.features, side):
        tensor = out[spec.name]
        assert tensor.shape[0] == rows, spec.name
        if spec.kind == "onehot":
            assert tensor.dtype == torch.float32 and tensor.shape == (rows, sizes[spec.name])
            assert torch.equal(tensor.sum(dim=1), torch.ones(rows))
        elif spec.kind == "dense" and spec.transform != "bucketize":
            assert tensor.dtype == torch.float32 and tensor.shape == (rows, 2)
            assert set(tensor[:, 1].tolist()) <= {0.0, 1.0}
            assert not tensor[tensor[:, 1] == 1, 0].any()  # missing: imputed 0
        else:
            assert tensor.dtype == torch.int64
            bound = sizes[spec.name]
            if spec.kind in ("id", "dense"):
                assert tensor.shape == (rows,)
            elif spec.kind == "history":
                assert tensor.shape == (rows, spec.max_len)
                bound = demo.pipeline.sizes("item")[spec.item_feature]
            else:
                assert tensor.ndim == 2 and 1 <= tensor.shape[1] <= spec.max_len
            assert rows == 0 or (tensor.min() >= 0 and tensor.max() < bound), spec.name


# ---- Fitting and transforming the demo -------------------------------------------------------


@pytest.mark.parametrize("side", ["query", "item"])
def test_every_kind_has_its_documented_shape_and_dtype(demo: Demo, side: str) -> None:
    table = demo.table(side)
    _check_outputs(demo, side, demo.pipeline.transform(side, table), table.num_rows)


def test_the_demo_uses_every_kind(demo: Demo) -> None:
    kinds = {spec.kind for spec in demo.features.query + demo.features.item}
    assert kinds == {"id", "onehot", "dense", "multihot", "history", "text"}


@pytest.mark.parametrize("side", ["query", "item"])
def test_no_rows_give_empty_tensors(demo: Demo, side: str) -> None:
    _check_outputs(demo, side, demo.pipeline.transform(side, demo.table(side).slice(0, 0)), 0)


def test_items_without_training_interactions_are_out_of_vocabulary(demo: Demo) -> None:
    trained = np.zeros(demo.dataset.num_items, bool)
    trained[demo.train.column(ITEM_IDX).to_numpy()] = True
    item_ids = demo.pipeline.transform("item", demo.dataset.items)["item_id"].numpy()
    assert (item_ids[~trained] == OOV).all()
    assert (item_ids[trained] >= 2).all()
    assert demo.pipeline.sizes("item")["item_id"] == trained.sum() + 2


# ---- Fitting sees the training split only ----------------------------------------------------

# Users 1-4, items 1-4. leave_last_out by timestamp:
#   user 1: 1, 2 train; 3 valid; 4 test      user 2: 3 train; 1 valid; 2 test
#   users 3 and 4: 3 train (a single interaction stays in train)
# Item 4 is only ever in test. Training interactions: item 3 three, items 1 and 2 one each.
TOY = {
    "query_id": [1, 1, 1, 1, 2, 2, 2, 3, 4],
    "item_id": [1, 2, 3, 4, 3, 1, 2, 3, 3],
    "timestamp": [1, 2, 3, 4, 1, 2, 3, 1, 1],
}
TOY_ITEMS = {
    "item_id": [1, 2, 3, 4],
    "category": ["x", "x", "y", "only-test"],
    "price": [1.0, 2.0, 3.0, 1000.0],
}
TOY_FEATURES = FeaturesConfig(
    query=[IdFeature("user_id", "query_id")],
    item=[
        IdFeature("item_id", "item_id"),
        OneHotFeature("category", "category"),
        DenseFeature("price", "price"),
    ],
)


@pytest.fixture
def toy() -> FeaturePipeline:
    dataset = Dataset.from_tables(pa.table(TOY), None, pa.table(TOY_ITEMS))
    train = split_interactions(dataset, SplitConfig()).train
    assert sorted(set(train.column("item_id").to_pylist())) == [1, 2, 3]
    return FeaturePipeline.fit(TOY_FEATURES, dataset, train)


def test_fitting_sees_training_rows_only(toy: FeaturePipeline) -> None:
    out = toy.transform("item", pa.table(TOY_ITEMS))
    # The item key counts training interactions: 3 (three), then 1 and 2 (one each, by value).
    assert out["item_id"].tolist() == [3, 4, 2, OOV]
    # Other columns count each trained item once: x (items 1, 2) before y (item 3).
    assert out["category"].argmax(dim=1).tolist() == [2, 2, 3, OOV]
    # Price statistics of items 1, 2, 3 only: mean 2, std sqrt(2/3); 1000 is not in them.
    s = math.sqrt(2 / 3)
    expected = torch.tensor([-1 / s, 0, 1 / s, 998 / s], dtype=torch.float32)
    torch.testing.assert_close(out["price"][:, 0], expected)


# ---- Saving and loading ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def saved(demo: Demo, tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("features")
    demo.pipeline.save(folder)
    return folder


def _copy(folder: Path, to: Path) -> Path:
    to.mkdir()
    for name in (STATE_FILE, ARRAYS_FILE):
        (to / name).write_bytes((folder / name).read_bytes())
    return to


def _assert_same_outputs(a: FeaturePipeline, b: FeaturePipeline, tables: dict) -> None:
    for side, table in tables.items():
        out_a, out_b = a.transform(side, table), b.transform(side, table)
        assert list(out_a) == list(out_b)
        for name in out_a:
            assert out_a[name].dtype == out_b[name].dtype, name
            assert torch.equal(out_a[name], out_b[name]), name
        assert a.sizes(side) == b.sizes(side)


def test_save_and_load_give_identical_tensors(demo: Demo, saved: Path) -> None:
    loaded = FeaturePipeline.load(saved)
    assert loaded.config == demo.features
    tables = {"query": demo.dataset.queries, "item": demo.dataset.items}
    _assert_same_outputs(demo.pipeline, loaded, tables)


def test_saving_again_writes_identical_bytes(demo: Demo, saved: Path, tmp_path: Path) -> None:
    demo.pipeline.save(tmp_path / "again")
    FeaturePipeline.load(saved).save(tmp_path / "reloaded")
    for name in (STATE_FILE, ARRAYS_FILE):
        original = (saved / name).read_bytes()
        assert (tmp_path / "again" / name).read_bytes() == original, name
        assert (tmp_path / "reloaded" / name).read_bytes() == original, name


def test_numeric_and_boolean_categories_survive_save_and_load(tmp_path: Path) -> None:
    # Categories that are floats or booleans (not ints or strings) must not come back as
    # text that no longer matches them ("1.0", "True").
    items = {
        "item_id": [1, 2, 3],
        "flag": [True, False, True],
        "score": [1.0, 2.5, 1.0],
        "tags": [[1.5, 2.0], [2.0], []],
    }
    interactions = pa.table({"query_id": [1, 1, 2, 2], "item_id": [1, 2, 3, 1]})
    dataset = Dataset.from_tables(interactions, None, pa.table(items))
    features = FeaturesConfig(
        query=[IdFeature("user_id", "query_id")],
        item=[
            OneHotFeature("flag", "flag"),
            IdFeature("score", "score"),
            MultiHotFeature("tags", "tags"),
        ],
    )
    pipeline = FeaturePipeline.fit(features, dataset, dataset.interactions)
    pipeline.save(tmp_path)
    loaded = FeaturePipeline.load(tmp_path)
    out = loaded.transform("item", pa.table(items))
    assert out["flag"].argmax(dim=1).tolist() == [2, 3, 2]  # True twice, False once
    assert out["score"].tolist() == [2, 3, 2]
    _assert_same_outputs(pipeline, loaded, {"item": pa.table(items)})


def test_a_corrupted_arrays_file_is_refused(saved: Path, tmp_path: Path) -> None:
    folder = _copy(saved, tmp_path / "corrupt")
    data = bytearray((folder / ARRAYS_FILE).read_bytes())
    data[len(data) // 2] ^= 0xFF
    (folder / ARRAYS_FILE).write_bytes(bytes(data))
    with pytest.raises(DataError, match="checksum"):
        FeaturePipeline.load(folder)


def test_a_missing_arrays_file_is_refused(saved: Path, tmp_path: Path) -> None:
    folder = _copy(saved, tmp_path / "partial")
    (folder / ARRAYS_FILE).unlink()
    with pytest.raises(DataError, match="missing"):
        FeaturePipeline.load(folder)


def test_another_format_version_is_refused(saved: Path, tmp_path: Path) -> None:
    folder = _copy(saved, tmp_path / "newer")
    meta = json.loads((folder / STATE_FILE).read_text())
    meta["format_version"] += 1
    (folder / STATE_FILE).write_text(json.dumps(meta))
    with pytest.raises(DataError, match="format version"):
        FeaturePipeline.load(folder)


def test_a_folder_without_state_is_refused(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no saved feature state"):
        FeaturePipeline.load(tmp_path)


def test_a_missing_column_names_the_available_ones(demo: Demo) -> None:
    items = demo.dataset.items.drop_columns(["title"])
    with pytest.raises(DataError, match="'title'") as error:
        demo.pipeline.transform("item", items)
    assert all(repr(column) in str(error.value) for column in items.column_names)


# ---- Any raw values --------------------------------------------------------------------------

ROWS = st.shared(st.integers(1, 5), key="rows")
ANY_FLOAT = st.none() | st.floats() | st.sampled_from([math.nan, math.inf, -math.inf])


def _column(values: st.SearchStrategy) -> st.SearchStrategy:
    return ROWS.flatmap(lambda n: st.lists(values, min_size=n, max_size=n))


def _known_or_any(known: list[str]) -> st.SearchStrategy:
    return st.none() | st.sampled_from(known) | st.text(max_size=8)


ITEM_COLUMNS = st.fixed_dictionaries(
    {
        "item_id": _column(st.none() | st.integers(-3, 1003) | st.integers(-(2**63), 2**63 - 1)),
        "category": _column(_known_or_any(CATEGORIES)),
        "price": _column(ANY_FLOAT),
        "views": _column(ANY_FLOAT),
        "genres": _column(
            st.none()
            | st.text(max_size=12)
            | st.lists(st.sampled_from([*GENRES, "zz"]), max_size=4).map("|".join)
        ),
        "title": _column(st.none() | st.text(max_size=30)),
    }
)
QUERY_COLUMNS = st.fixed_dictionaries(
    {
        "user_id": _column(st.none() | st.integers(-3, 2003) | st.integers(-(2**63), 2**63 - 1)),
        "segment": _column(_known_or_any(SEGMENTS)),
        "age": _column(ANY_FLOAT),
        "sessions": _column(ANY_FLOAT),
    }
)
TYPES = {"item_id": pa.int64(), "user_id": pa.int64(), "price": pa.float64()}
TYPES |= {"views": pa.float64(), "age": pa.float64(), "sessions": pa.float64()}


def _table(columns: dict[str, list]) -> pa.Table:
    return pa.table({k: pa.array(v, TYPES.get(k, pa.string())) for k, v in columns.items()})


def _missing(values: list) -> np.ndarray:
    return np.array([v is None or (isinstance(v, float) and not math.isfinite(v)) for v in values])


def _expected_ids(demo: Demo, side: str, key: str, values: list) -> list[int]:
    """0 for missing, the full table's index for a trained id, else 1."""
    known = dict(
        zip(
            demo.table(side).column(key).to_pylist(),
            demo.pipeline.transform(side, demo.table(side))[key].tolist(),
            strict=True,
        )
    )
    return [MISSING if v is None else known.get(v, OOV) for v in values]


def _check_dense(out: torch.Tensor, values: list, log1p: bool) -> None:
    flags = _missing(values)
    assert out[:, 1].numpy().astype(bool).tolist() == flags.tolist()
    assert not out[flags, 0].any()
    finite = [log1p or abs(v) < 1e30 for v, flag in zip(values, flags, strict=True) if not flag]
    assert torch.isfinite(out[~flags, 0][finite]).all()


def _check_categories(one_hot: torch.Tensor, values: list, trained: list[str]) -> None:
    for value, index in zip(values, one_hot.argmax(dim=1).tolist(), strict=True):
        if value is None:
            assert index == MISSING
        elif value in trained:
            assert index >= 2
        else:
            assert index == OOV


@settings(deadline=None, max_examples=60)
@given(ITEM_COLUMNS)
def test_any_item_values_transform(demo: Demo, columns: dict[str, list]) -> None:
    out = demo.pipeline.transform("item", _table(columns))
    rows = len(columns["item_id"])
    _check_outputs(demo, "item", out, rows)
    assert out["item_id"].tolist() == _expected_ids(demo, "item", "item_id", columns["item_id"])

    _check_categories(out["category"], columns["category"], CATEGORIES)

    assert (out["price"][_missing(columns["price"])] == MISSING).all()
    assert (out["price"][~_missing(columns["price"])] >= 1).all()
    _check_dense(out["views"], columns["views"], log1p=True)

    vocabulary = demo.pipeline.transforms["item"]["genres"].vocabulary
    index = dict(zip(GENRES, vocabulary.lookup(pa.array(GENRES)).tolist(), strict=True), zz=OOV)
    for value, genres in zip(columns["genres"], out["genres"].tolist(), strict=True):
        tokens = [t for t in (value or "").split("|") if t]
        if all(t in index for t in tokens):  # else arbitrary text, checked by _check_outputs
            assert genres == [index[t] for t in tokens] + [0] * (len(genres) - len(tokens))
    for value, title in zip(columns["title"], out["title"], strict=True):
        assert value or not title.any()


# Standardizing a finite value near 1e308 overflows float32 to inf (age is standardized).
@pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")
@settings(deadline=None, max_examples=60)
@given(QUERY_COLUMNS)
def test_any_query_values_transform(demo: Demo, columns: dict[str, list]) -> None:
    out = demo.pipeline.transform("query", _table(columns))
    _check_outputs(demo, "query", out, len(columns["user_id"]))
    ids = columns["user_id"]
    assert out["user_id"].tolist() == _expected_ids(demo, "query", "user_id", ids)

    _check_categories(out["segment"], columns["segment"], SEGMENTS)

    _check_dense(out["age"], columns["age"], log1p=False)
    _check_dense(out["sessions"], columns["sessions"], log1p=True)

    users = demo.dataset.queries.column("user_id").to_pylist()
    full = demo.pipeline.transform("query", demo.dataset.queries)["history"]
    for value, history in zip(ids, out["history"], strict=True):
        expected = full[users.index(value)] if value in users else torch.zeros_like(history)
        assert torch.equal(history, expected)
