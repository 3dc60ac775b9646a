"""One contract over every data source: the in-memory split and its data build answer
each question alike, query by query; a stream without a build refuses by name."""

from __future__ import annotations

import dataclasses
import re

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest
import scipy.sparse as sp

from twotower.config import Config
from twotower.data.build.format import built_stream
from twotower.data.config import DataConfig, SplitConfig, StreamConfig
from twotower.data.dataset import QUERY_IDX, TIMESTAMP
from twotower.errors import ConfigError
from twotower.features.specs import FeaturesConfig, HistoryFeature, IdFeature
from twotower.features.transform import OOV
from twotower.prepare import build_data
from twotower.sources import (
    NEEDS_BUILD,
    NO_WARM_START,
    BuiltSource,
    DataSource,
    MemorySource,
    StreamSource,
    load_data,
    open_source,
)

pytest.importorskip("duckdb")

FEATURES = FeaturesConfig(
    query=[HistoryFeature("history", "user_id", "item_id", max_len=8)],
    item=[IdFeature("item_id", "item_id", dim=8)],
)


@pytest.fixture(scope="module")
def configs(tmp_path_factory, tiny_demo) -> dict[str, Config]:
    """The tiny demo in memory (random split: several held-out items per query), and
    as a stream of its build."""
    folder = tmp_path_factory.mktemp("sources")
    memory = tiny_demo(folder / "data", "split.method=random")
    memory = dataclasses.replace(
        memory, data=dataclasses.replace(memory.data, queries=None), features=FEATURES
    )
    build_data(memory, folder / "built")
    stream = StreamConfig(built=folder / "built", workers=0)
    built = dataclasses.replace(memory, data=DataConfig(source="stream", stream=stream))
    plain = DataConfig(source="stream", stream=built_stream(stream))  # its files, no build
    return {"memory": memory, "built": built, "stream": dataclasses.replace(memory, data=plain)}


@pytest.fixture(params=["memory", "built"])
def source(request, configs) -> DataSource:
    return open_source(configs[request.param])


def _sources(configs: dict[str, Config]) -> list[tuple[DataSource, Config]]:
    return [(open_source(configs[kind]), configs[kind]) for kind in ("memory", "built")]


def _by_key(source: DataSource, matrix: sp.csr_matrix, keys: list) -> dict:
    """Each query key's row of ``matrix`` as a set of item keys (queries with none left out)."""
    items = source.items().column(source.item_key).to_pylist()
    return {
        key: {items[i] for i in matrix[row].indices}
        for row, key in enumerate(keys)
        if matrix[row].nnz
    }


def _held_out(source: DataSource, config: Config, part: str) -> tuple[dict, dict]:
    """Every query's seen and held-out items before/in ``part``, by query key."""
    seen, targets = {}, {}
    pipeline = source.fit_features(config).pipeline
    for chunk in source.held_out(part, pipeline):
        keys = chunk.queries.column(source.query_key).to_pylist()
        seen |= _by_key(source, chunk.seen, keys)
        targets |= _by_key(source, chunk.targets, keys)
    return seen, targets


def test_open_source_chooses_by_the_config(configs):
    assert type(open_source(configs["memory"])) is MemorySource
    assert type(open_source(configs["built"])) is BuiltSource
    assert type(open_source(configs["stream"])) is StreamSource


@pytest.mark.parametrize("part", ["valid", "test"])
def test_both_sources_hold_the_same_queries_seen_and_held_out_items(configs, part):
    (memory_seen, memory_targets), (built_seen, built_targets) = (
        _held_out(source, config, part) for source, config in _sources(configs)
    )
    assert len(memory_targets) > 50
    assert built_targets == memory_targets
    assert {k: v for k, v in built_seen.items() if k in memory_targets} == {
        k: v for k, v in memory_seen.items() if k in memory_targets
    }


@pytest.mark.parametrize("part", ["valid", "test"])
def test_popularity_counts_the_queries_that_knew_each_item_before_the_part(source, part):
    counts = np.zeros(source.num_items())
    for chunk in source.held_out(part):
        counts += np.asarray(chunk.seen.sum(axis=0)).ravel()
    np.testing.assert_allclose(source.popularity(part), counts)
    assert counts.sum() > 0


def test_item_tables_agree(configs):
    memory, built = (open_source(configs[kind]) for kind in ("memory", "built"))
    assert memory.num_items() == built.num_items() == memory.items().num_rows
    assert (
        memory.items().column("item_id").to_pylist() == built.items().column("item_id").to_pylist()
    )


@pytest.mark.parametrize("as_of", ["valid", "all"])
def test_known_queries_hold_what_each_query_knew_as_of_the_state(configs, as_of):
    states = []
    for source, config in _sources(configs):
        known = source.known_queries(as_of, source.fit_features(config).pipeline)
        keys = known.queries.column(source.query_key).to_pylist()
        states.append((_by_key(source, known.seen, keys), _by_key(source, known.heldout, keys)))
    assert states[0] == states[1]
    dataset, split = load_data(configs["memory"])
    known = pa.concat_tables(
        [split.train, split.valid] if as_of == "valid" else [dataset.interactions]
    )
    pairs = set(zip(*(known.column(c).to_pylist() for c in ("query_idx", "item_idx")), strict=True))
    assert sum(len(items) for items in states[0][0].values()) == len(pairs)


def test_a_sample_is_for_a_build(configs):
    with pytest.raises(ConfigError, match="a sample of queries is for a data build"):
        next(open_source(configs["memory"]).held_out("test", sample=10))
    built = open_source(configs["built"])
    everyone = sum(c.targets.shape[0] for c in built.held_out("test"))
    sampled = sum(c.targets.shape[0] for c in built.held_out("test", sample=everyone // 2))
    again = sum(c.targets.shape[0] for c in built.held_out("test", sample=everyone // 2))
    assert 0 < sampled == again < everyone


def test_refit_moves_validation_into_training_in_memory_and_is_refused_on_a_build(configs):
    memory = open_source(configs["memory"])
    refit = memory.refit()
    assert refit.split.valid.num_rows == 0
    assert refit.split.train.num_rows == memory.split.train.num_rows + memory.split.valid.num_rows
    assert refit.split.test.equals(memory.split.test)
    with pytest.raises(ConfigError, match="training.refit needs the data in memory"):
        open_source(configs["built"]).refit()


def test_a_stream_without_a_build_trains_and_refuses_what_needs_one_by_name(configs):
    source = open_source(configs["stream"])
    features = source.fit_features(configs["stream"])
    assert features.counts.sum() == load_data(configs["memory"])[1].train.num_rows
    message = re.escape(NEEDS_BUILD.format(what="").split(": ", 1)[1])  # what to do
    for call in (
        lambda: source.held_out("test"),
        lambda: source.num_queries("test"),
        lambda: source.popularity("test"),
        lambda: source.known_queries("all", features.pipeline),
    ):
        with pytest.raises(ConfigError, match=message):
            call()


def test_load_data_refuses_a_stream_naming_what_it_needs(configs):
    with pytest.raises(ConfigError, match="needs the data in memory"):
        load_data(configs["built"])


def test_a_warm_start_grows_features_in_memory_and_is_refused_on_a_stream(configs):
    memory = open_source(configs["memory"])
    earlier = memory.fit_features(configs["memory"]).pipeline
    grown = memory.fit_features(configs["memory"], init=earlier).pipeline
    assert grown.sizes("item") == earlier.sizes("item")  # the same data: nothing new
    message = re.escape(NO_WARM_START.format(what="").split(";")[0])
    for kind in ("built", "stream"):
        with pytest.raises(ConfigError, match=message):
            open_source(configs[kind]).fit_features(configs[kind], init=earlier)


def test_a_new_period_fits_features_on_its_examples_and_histories_on_all_it_knows(configs):
    config = configs["memory"]
    times = load_data(config)[0].column(TIMESTAMP)
    train_from = float(np.quantile(times, 0.5))
    split = SplitConfig(
        method="time",
        valid_from=float(np.quantile(times, 0.8)),
        test_from=float(np.quantile(times, 0.9)),
        train_from=train_from,
    )
    source = open_source(dataclasses.replace(config, split=split))
    pipeline = source.fit_features(config).pipeline
    train = source.split.train
    examples = source.split.training_examples
    assert 0 < examples.num_rows < train.num_rows
    items = pipeline.transforms["item"]["item_id"].vocabulary
    example_items = set(
        source.dataset.items.column("item_id").take(examples.column("item_idx")).to_pylist()
    )
    assert set(items.values.to_pylist()) == example_items  # fitted on the examples alone
    # a query's history holds its interactions before train_from too
    earliest = train.filter(pc.less(train.column(TIMESTAMP), train_from))
    query = earliest.column(QUERY_IDX)[0].as_py()
    history = pipeline.transform("query", source.dataset.queries.slice(query, 1))["history"]
    lengths = np.bincount(train.column(QUERY_IDX).to_numpy())
    assert (history > 0).sum() == min(lengths[query], 8)


def test_a_new_period_is_refused_on_a_stream(configs):
    with pytest.raises(ValueError, match=r"split.train_from .* \(not a stream\)"):
        dataclasses.replace(configs["built"], split=SplitConfig(train_from=1.0))


def test_new_items_reach_no_vocabulary_history_or_seen_item(configs):
    """``split.new_items``: the items held out of training are unknown to every fitted
    vocabulary, to the histories and to the items each query knew before either part;
    their ids read as out of vocabulary, as a new id does at serving."""
    config = configs["memory"]
    config = dataclasses.replace(config, split=dataclasses.replace(config.split, new_items=0.2))
    source = open_source(config)
    new = source.new_items("test")
    assert len(new) > 0 and source.new_items("valid") is None
    pipeline = source.fit_features(config).pipeline
    ids = source.dataset.items.column("item_id")
    vocabulary = set(pipeline.transforms["item"]["item_id"].vocabulary.values.to_pylist())
    assert not vocabulary & set(ids.take(pa.array(new)).to_pylist())
    codes = pipeline.transform("item", source.items())["item_id"].numpy()
    assert (codes[new] == OOV).all()
    split = source.split
    for part, known in (("valid", [split.train]), ("test", [split.train, split.valid])):
        (chunk,) = source.held_out(part, pipeline)
        assert chunk.seen[:, new].nnz == 0 and source.popularity(part)[new].sum() == 0
        assert (chunk.targets[:, new].nnz > 0) == (part == "test")
        # each query's history is its known interactions, the new items' none of them
        history = chunk.pipeline.transform("query", chunk.queries)["history"].numpy()
        counts = np.bincount(
            pa.concat_tables(known).column(QUERY_IDX).to_numpy(), minlength=len(history)
        )
        assert ((history > 0).sum(axis=1) == np.minimum(counts, 8)).all()
    served = source.known_queries("valid", pipeline)
    assert served.seen[:, new].nnz == 0 and not np.isin(served.recent.rows, new).any()


def test_new_items_are_refused_on_a_stream(configs):
    assert open_source(configs["built"]).new_items("test") is None
    with pytest.raises(ValueError, match=r"split.new_items .* a stream or a data build cannot"):
        dataclasses.replace(configs["built"], split=SplitConfig(new_items=0.1))
