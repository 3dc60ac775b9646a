"""Fitting from a stream of batches: exact fits equal the whole-table fit; past the
bounds, the approximations keep their stated guarantees."""

import numpy as np
import pyarrow as pa
import pytest
import torch

from twotower.errors import ConfigError, DataError
from twotower.features.pipeline import FeaturePipeline
from twotower.features.specs import (
    DenseFeature,
    FeaturesConfig,
    HistoryFeature,
    IdFeature,
    MultiHotFeature,
    OneHotFeature,
    TextFeature,
)
from twotower.features.streaming import CountSummary, SampleSummary, StreamingFit
from twotower.features.transform import FitContext

FEATURES = [
    IdFeature("user", "user"),
    IdFeature("rare_cut", "user", min_count=3, max_size=40),
    IdFeature("hashed", "user", hash_buckets=64),
    OneHotFeature("segment", "segment"),
    MultiHotFeature("genres", "genres"),
    DenseFeature("age", "age"),
    DenseFeature("visits", "visits", transform="log1p"),
    DenseFeature("price", "price", transform="bucketize", num_buckets=7),
    TextFeature("title", "title", buckets=128),
]


def table(rows: int, seed: int = 0) -> pa.Table:
    rng = np.random.default_rng(seed)
    users = rng.zipf(1.5, rows) % 500
    age = np.where(rng.random(rows) < 0.05, np.nan, rng.normal(40, 12, rows))
    genres = np.array(["a|b", "b", "", "c|a|d", "d"])[rng.integers(5, size=rows)]
    return pa.table(
        {
            "user": pa.array(users, mask=rng.random(rows) < 0.02),
            "segment": np.array(["x", "y", "z"])[rng.integers(3, size=rows)],
            "genres": genres,
            "age": age,
            "visits": rng.lognormal(2, 1.5, rows),
            "price": np.round(rng.lognormal(3, 1, rows), 1),
            "title": np.array(["red car", "blue sky", "green"])[rng.integers(3, size=rows)],
        }
    )


def test_exact_streaming_fit_equals_the_whole_table_fit():
    whole = table(5000)
    config = FeaturesConfig(query=FEATURES)
    reference = FeaturePipeline(config)
    for transform in reference.transforms["query"].values():
        transform.fit(whole.column(transform.spec.column).combine_chunks(), FitContext())
    streamed = FeaturePipeline(config)
    fit = StreamingFit(streamed.transforms["query"])
    for start in range(0, whole.num_rows, 333):  # uneven batches
        fit.update(whole.slice(start, 333))
    assert all(fit.finish().values())
    expected, got = reference.transform("query", whole), streamed.transform("query", whole)
    for name in expected:
        if name in ("age", "visits"):  # merged moments: equal to float rounding
            np.testing.assert_allclose(got[name].numpy(), expected[name].numpy(), atol=1e-5)
        else:
            assert np.array_equal(got[name].numpy(), expected[name].numpy()), name


def test_counts_past_capacity_keep_the_misra_gries_bound():
    rng = np.random.default_rng(1)
    values = rng.zipf(1.3, 200_000) % 5000
    summary = CountSummary(capacity=100)
    for chunk in np.array_split(values, 37):
        summary.update(pa.array(chunk))
    assert not summary.exact
    true = np.bincount(values, minlength=5000)
    bound = len(values) / (100 + 1)
    kept = summary.values.to_numpy()
    estimate = np.zeros(5000)
    estimate[kept] = summary.counts
    assert np.all(estimate <= true)  # never over
    assert np.all(true - estimate <= bound)  # never short by more than N / (k + 1)
    assert set(np.flatnonzero(true > bound)) <= set(kept)  # every heavy hitter kept
    assert summary.error <= bound


def test_quantiles_past_capacity_come_from_a_uniform_sample():
    rng = np.random.default_rng(2)
    values = rng.lognormal(0, 1, 300_000)
    sample = SampleSummary(capacity=20_000, seed=0)
    for chunk in np.array_split(values, 11):
        sample.update(chunk)
    assert not sample.exact and len(sample.values) == 20_000
    q = np.linspace(0.1, 0.9, 9)
    ranks = np.searchsorted(np.sort(values), np.quantile(sample.values, q)) / len(values)
    np.testing.assert_allclose(ranks, q, atol=0.02)  # rank error ~ 1/sqrt(20,000)


def test_the_fit_reports_which_features_are_approximate():
    config = FeaturesConfig(query=[IdFeature("user", "user"), DenseFeature("age", "age")])
    pipeline = FeaturePipeline(config)
    fit = StreamingFit(pipeline.transforms["query"], max_distinct=10)
    fit.update(table(2000))
    assert fit.finish() == {"user": False, "age": True}
    assert pipeline.sizes("query")["user"] <= 10 + 2


def test_a_streamed_history_reads_its_rows_list_column():
    """Fitted from a stream, a history has no state: each row's list column of item
    ids (most recent first) maps through the item-id vocabulary, a null item to a blank."""
    config = FeaturesConfig(
        query=[HistoryFeature("history", "user", "item", max_len=3)],
        item=[IdFeature("item", "item")],
    )
    pipeline = FeaturePipeline(config)
    items = pa.table({"item": ["a", "b", "c"]})
    pipeline.fit_side("item", items, "item", np.ones(3, np.int64))
    fit = StreamingFit(pipeline.transforms["query"])
    fit.update(pa.table({"user": [1]}))
    assert fit.finish() == {"history": True}
    rows = pa.table({"history": [["c", "a"], [], ["b", None, "a", "c"], None]})
    got = pipeline.transform("query", rows)["history"]
    code = dict(
        zip("abc", pipeline.transforms["item"]["item"].transform(items["item"]), strict=True)
    )
    assert got.tolist() == [
        [code["c"], code["a"], 0],
        [0, 0, 0],
        [code["b"], 0, code["a"]],  # at most max_len; the null a blank
        [0, 0, 0],
    ]
    restored = FeaturePipeline.from_bytes(*pipeline.to_bytes(), where="test")
    assert torch.equal(restored.transform("query", rows)["history"], got)
    with pytest.raises(DataError, match="reads its rows' list column 'history'"):
        pipeline.transform("query", pa.table({"user": [1]}))


def test_a_streamed_history_cannot_have_time_buckets():
    spec = HistoryFeature("history", "user", "item", encoder="attention", time_buckets=4)
    config = FeaturesConfig(query=[spec], item=[IdFeature("item", "item")])
    with pytest.raises(ConfigError, match="time_buckets need each item's timestamp"):
        StreamingFit(FeaturePipeline(config).transforms["query"])


def test_input_column_is_the_one_answer_to_which_column_a_feature_reads():
    """A history fitted in memory reads the query key column; fitted from rows, its
    own list column. The pipeline's transform, the input contract and every side's
    column list take that one answer."""
    from twotower.features.contract import input_contract

    config = FeaturesConfig(
        query=[IdFeature("user", "user"), HistoryFeature("history", "user", "item", max_len=3)],
        item=[IdFeature("item", "item")],
    )
    in_memory, from_rows = FeaturePipeline(config), FeaturePipeline(config)
    assert in_memory.input_column("query", "history") == "user"
    assert in_memory.input_columns("query") == ["user"]
    from_rows.fit_side("item", pa.table({"item": ["a", "b"]}), "item", np.ones(2, np.int64))
    fit = StreamingFit(from_rows.transforms["query"])
    fit.update(pa.table({"user": [1, 2]}))
    fit.finish()
    assert from_rows.input_column("query", "history") == "history"
    assert from_rows.input_column("query", "user") == "user"
    assert from_rows.input_columns("query") == ["user", "history"]
    assert from_rows.input_column("item", "item") == "item"
    contract = {entry["name"]: entry["column"] for entry in input_contract(from_rows, "query")}
    assert contract == {"user": "user", "history": "history"}
    rows = pa.table({"user": [1], "history": [["b"]]})
    assert set(from_rows.transform("query", rows)) == {"user", "history"}
