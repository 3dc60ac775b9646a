"""Growing an earlier fit onto new data: old codes kept, new values appended, statistics
kept, histories rebuilt; refused between different features."""

from __future__ import annotations

import dataclasses
from importlib.resources import files

import numpy as np
import pyarrow as pa
import pytest

from twotower.config import load_config
from twotower.data.dataset import ITEM_IDX, QUERY_IDX, Dataset
from twotower.data.load import load_dataset
from twotower.data.splits import split_interactions
from twotower.errors import ConfigError, DataError
from twotower.features.categorical import IdTransform, MultiHotTransform, Vocabulary
from twotower.features.growth import feature_differences
from twotower.features.pipeline import FeaturePipeline
from twotower.features.specs import FeaturesConfig, IdFeature

# ---- Vocabulary.grow -------------------------------------------------------------------


def _fit(values: list, min_count: int = 1, max_size: int | None = None) -> Vocabulary:
    return Vocabulary.fit(pa.array(values), None, min_count, max_size)


def test_growing_keeps_every_code_and_appends_new_values_most_frequent_first() -> None:
    old = _fit(["a", "b", "b", "c"])  # b, a, c
    fresh = _fit(["d", "e", "e", "a", "e", "d", "f", "b"])  # e 3, d 2, a, b, f
    grown = old.grow(fresh)
    assert grown.values.to_pylist() == ["b", "a", "c", "e", "d", "f"]
    assert grown.lookup(pa.array(["b", "a", "c"])).tolist() == [2, 3, 4]  # as before
    assert old.lookup(pa.array(["e"])).tolist() == [1]  # unknown before


def test_growing_counts_min_count_on_the_new_data_only() -> None:
    old = _fit(["a", "a", "b"], min_count=2)  # a
    fresh = _fit(["b", "c", "c", "d"], min_count=2)  # c; b is rare in the new data too
    assert old.grow(fresh).values.to_pylist() == ["a", "c"]


def test_growing_to_max_size_leaves_new_values_out_never_old_ones() -> None:
    old = _fit(["a", "b", "c"])
    fresh = _fit(["d", "d", "e", "f", "f", "f"])  # f, d, e
    assert old.grow(fresh, max_size=5).values.to_pylist() == ["a", "b", "c", "f", "d"]
    assert old.grow(fresh, max_size=2).values.to_pylist() == ["a", "b", "c"]


def test_growing_from_an_empty_vocabulary_is_the_fresh_fit() -> None:
    fresh = _fit([3, 1, 1])
    assert Vocabulary().grow(fresh).values.to_pylist() == [1, 3]


def test_growing_numbers_with_text_that_is_no_number_is_refused() -> None:
    with pytest.raises(DataError, match="cannot join a vocabulary of int64"):
        _fit([1, 2]).grow(_fit(["x"]))


# ---- FeaturePipeline.extend ------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Grown:
    dataset: Dataset
    old: FeaturePipeline  # fitted on the first months' users and items
    fresh: FeaturePipeline  # fitted on all of train, from scratch
    grown: FeaturePipeline  # the old one grown with all of train


@pytest.fixture(scope="module")
def grown() -> Grown:
    config = load_config(files("twotower") / "recipes" / "demo.yaml")
    features = dataclasses.replace(
        config.features,
        item=[*config.features.item, IdFeature("item_hash", "item_id", hash_buckets=64)],
    )
    dataset = load_dataset(config.data)
    train = split_interactions(dataset, config.split).train
    # earlier data: two thirds of the users, on the first 600 items (so both sides
    # have ids the earlier fit never saw), and other statistics than all of train
    query, item = train.column(QUERY_IDX).to_numpy(), train.column(ITEM_IDX).to_numpy()
    earlier = train.filter(pa.array((query % 3 != 0) & (item < 600)))
    old = FeaturePipeline.fit(features, dataset, earlier)
    fresh = FeaturePipeline.fit(features, dataset, train)
    return Grown(dataset, old, fresh, old.extend(features, dataset, train))


def _vocabulary(pipeline: FeaturePipeline, side: str, name: str) -> list:
    return pipeline.transforms[side][name].vocabulary.values.to_pylist()


@pytest.mark.parametrize(("side", "name"), [("query", "user_id"), ("item", "item_id")])
def test_an_id_vocabulary_keeps_old_codes_and_appends_the_new_ids(grown, side, name) -> None:
    old, fresh = _vocabulary(grown.old, side, name), _vocabulary(grown.fresh, side, name)
    after = _vocabulary(grown.grown, side, name)
    new = [value for value in fresh if value not in set(old)]
    assert new and after == old + new  # in the order a fresh fit gives them
    table = grown.dataset.queries if side == "query" else grown.dataset.items
    before = grown.old.transform(side, table)[name]
    codes = grown.grown.transform(side, table)[name]
    known = before > 1  # an old id: the same code; an id new to it: a code of its own
    assert (codes[known] == before[known]).all()
    assert (codes[~known] >= len(old) + 2).all()


def test_a_multihot_vocabulary_grows_too(grown) -> None:
    old = _vocabulary(grown.old, "item", "genres")
    assert _vocabulary(grown.grown, "item", "genres")[: len(old)] == old
    assert isinstance(grown.grown.transforms["item"]["genres"], MultiHotTransform)


@pytest.mark.parametrize(
    ("side", "name"),
    [
        ("query", "segment"),  # one-hot: its width is the network's input
        ("query", "age"),  # standardize
        ("query", "sessions"),  # log1p
        ("item", "price"),  # quantile buckets
        ("item", "views"),
        ("item", "title"),  # text hashing: no state
        ("item", "item_hash"),  # hashed id: no state
    ],
)
def test_statistics_and_hashing_are_kept_as_fitted_before(grown, side, name) -> None:
    old, fresh = grown.old.transforms[side][name], grown.fresh.transforms[side][name]
    kept = grown.grown.transforms[side][name]
    table = grown.dataset.queries if side == "query" else grown.dataset.items
    column = table.column(kept.spec.column)
    assert np.array_equal(kept.transform(column), old.transform(column))
    assert repr(kept.state()) == repr(old.state())
    if name in ("age", "sessions", "price", "views"):  # a refit would have shifted them
        assert repr(fresh.state()) != repr(old.state())


def test_histories_are_rebuilt_from_the_new_data_in_the_grown_codes(grown) -> None:
    queries = grown.dataset.queries
    ids = {}
    for name, pipeline in (("fresh", grown.fresh), ("grown", grown.grown)):
        codes = pipeline.transform("query", queries)["history"].numpy()
        values = np.array([None, None, *_vocabulary(pipeline, "item", "item_id")], object)
        ids[name] = values[codes]  # each history's item ids (None: padding)
    assert (ids["grown"] == ids["fresh"]).all()
    assert (ids["grown"] != None).any()  # noqa: E711 (elementwise)


def test_extend_refuses_other_features_and_names_what_differs(grown) -> None:
    features = grown.old.config
    other = dataclasses.replace(
        features,
        item=[dataclasses.replace(features.item[0], dim=16), *features.item[1:]],
    )
    with pytest.raises(ConfigError, match=r"features\.item\.item_id\.dim \(32 vs 16\)"):
        grown.old.extend(other, grown.dataset, grown.dataset.interactions)


def test_only_min_count_max_size_and_dropout_may_differ() -> None:
    old = FeaturesConfig(query=[IdFeature("u", "u")], item=[IdFeature("i", "i")])
    looser = FeaturesConfig(
        query=[IdFeature("u", "u", min_count=3, max_size=10)], item=[IdFeature("i", "i")]
    )
    assert feature_differences(old, looser) == []
    renamed = FeaturesConfig(query=[IdFeature("u", "u")], item=[IdFeature("j", "i")])
    assert feature_differences(old, renamed) == ["features.item (['i'] vs ['j'])"]
    hashed = FeaturesConfig(query=[IdFeature("u", "u", hash_buckets=8)], item=old.item)
    assert feature_differences(old, hashed) == ["features.query.u.hash_buckets (0 vs 8)"]


def test_an_id_transform_grown_reads_new_values_with_new_codes() -> None:
    spec = IdFeature("u", "u")
    old, fresh = IdTransform(spec), IdTransform(spec)
    old.vocabulary, fresh.vocabulary = _fit(["a", "b"]), _fit(["c", "a"])
    grown = old.grow(fresh)
    assert grown.transform(pa.array(["a", "b", "c", "z", None])).tolist() == [2, 3, 4, 1, 0]
    assert grown.size == old.size + 1
    assert old.vocabulary.values.to_pylist() == ["a", "b"]  # the earlier fit is untouched
