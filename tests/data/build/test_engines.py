"""The engines' contract: every engine's ``twotower data build`` equals, row for row,
the in-memory ``split_interactions`` on the same files, for every split method; its
output appears whole or not at all; bad input is named, in the same words. Each test
runs on every engine in ``ENGINES`` (the ``engine`` fixture)."""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
import textwrap
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from twotower.data.build.engine import build_split
from twotower.data.build.format import MANIFEST, POSITION, read_build_manifest
from twotower.data.build.job import BuildOptions, Histories
from twotower.data.config import DataConfig, InteractionsConfig, SplitConfig
from twotower.data.dataset import ITEM_ID, QUERY_ID, TIMESTAMP
from twotower.data.load import load_dataset
from twotower.data.splits import SPLIT_NAMES, split_interactions
from twotower.errors import ConfigError, DataError

pytest.importorskip("duckdb")

DATASETS = Path(__file__).resolve().parents[4] / "shared" / "datasets"
ML1M = DATASETS / "ml-1m"


def in_memory(data: DataConfig, split: SplitConfig) -> dict[str, list[tuple]]:
    dataset = load_dataset(data)
    parts = split_interactions(dataset, split)
    return {name: _rows(parts.part(name)) for name in SPLIT_NAMES}


def built(folder: Path, names: tuple[str, ...] = (QUERY_ID, ITEM_ID, TIMESTAMP)) -> dict:
    """Each part's (query, item, time) rows; ``names``: the build's names for them (the
    interactions' own column names)."""
    manifest = read_build_manifest(folder)
    tables = {name: [] for name in SPLIT_NAMES}
    for relative in sorted(manifest["files"]):
        part = relative.split("/")[0].removesuffix(".parquet")
        if part in tables:
            tables[part].append(pq.read_table(folder / relative))
    canonical = dict(zip(names, (QUERY_ID, ITEM_ID, TIMESTAMP), strict=True))
    return {
        name: _rows(
            pa.concat_tables(parts).rename_columns(
                [canonical.get(c, c) for c in parts[0].column_names]
            )
        )
        for name, parts in tables.items()
    }


def _rows(table: pa.Table) -> list[tuple]:
    columns = [c for c in (QUERY_ID, ITEM_ID, TIMESTAMP) if c in table.column_names]
    return list(zip(*(table[c].to_pylist() for c in columns), strict=True))


@pytest.mark.parametrize("method", ["leave_last_out", "random", "time"])
def test_every_split_equals_the_in_memory_one(engine, generated, method, tmp_path, splits):
    options = BuildOptions(rows_per_part=1200, row_group_rows=300, threads=2)
    manifest = build_split(generated, splits[method], tmp_path / "built", options, engine=engine)
    assert manifest["engine"] == engine
    assert built(tmp_path / "built") == in_memory(generated, splits[method])
    assert len([f for f in manifest["files"] if f.startswith("train/")]) > 1
    first = pq.ParquetFile(tmp_path / "built" / "train" / "part-00000.parquet")
    assert first.metadata.num_row_groups == 4 and first.metadata.row_group(0).num_rows == 300


def test_min_weight_keeps_positions_of_the_kept_rows(engine, tmp_path):
    """Positions count kept rows only, as the in-memory Dataset's row order does, so the
    random split's draws line up."""
    path = tmp_path / "i.csv"
    rng = np.random.default_rng(0)
    lines = ["u,i,r"] + [
        f"{rng.integers(40)},{rng.integers(60)},{rng.integers(1, 6)}" for _ in range(3000)
    ]
    path.write_text("\n".join(lines) + "\n")
    data = DataConfig(
        source="files",
        interactions=InteractionsConfig(path, query_id="u", item_id="i", weight="r"),
        min_weight=3,
    )
    split = SplitConfig(method="random", seed=1)
    build_split(data, split, tmp_path / "built", engine=engine)
    assert built(tmp_path / "built", ("u", "i", "t")) == in_memory(data, split)
    train = pq.read_table(tmp_path / "built" / "train" / "part-00000.parquet")
    assert train[POSITION].to_numpy().max() < 3000 * 0.61  # about 60% kept


@pytest.mark.parametrize("method", ["leave_last_out", "random"])
def test_movielens_100k_splits_equal_the_in_memory_ones(
    engine, ml100k_files, method, tmp_path, splits
):
    data = ml100k_files
    build_split(data, splits[method], tmp_path / "built", engine=engine)
    got = built(tmp_path / "built", ("user", "item", "ts"))
    assert got == in_memory(data, splits[method])


def test_a_finished_build_is_checked_on_read(engine, generated, tmp_path, splits):
    build_split(generated, splits["random"], tmp_path / "built", engine=engine)
    (tmp_path / "built" / "valid.parquet").write_bytes(b"changed")
    with pytest.raises(DataError, match=r"valid.parquet: checksum mismatch"):
        read_build_manifest(tmp_path / "built")
    with pytest.raises(DataError, match="not a finished data build"):
        read_build_manifest(tmp_path)


def test_a_killed_build_leaves_no_output(engine, generated, tmp_path):
    """SIGKILL in the middle of a build: no folder that reads as a build appears, and
    the next build replaces what the killed one left."""
    out = tmp_path / "built"
    script = textwrap.dedent(
        f"""
        import time, twotower.data.build.plan as plan
        from pathlib import Path
        from twotower.data.build.engine import build_split
        from twotower.data.config import DataConfig, InteractionsConfig, SplitConfig
        slow = plan.write_parts
        def stalled(*args):
            files = slow(*args)
            print("written", flush=True)
            time.sleep(120)
            return files
        plan.write_parts = stalled
        data = DataConfig(source="files", interactions=InteractionsConfig(
            Path({str(generated.interactions.path)!r}), query_id="query_id", item_id="item_id",
            timestamp="timestamp"))
        build_split(data, SplitConfig(), Path({str(out)!r}), engine={engine!r})
        """
    )
    process = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert "written" in [line.strip() for line in _until("written", process.stdout)]
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert not (out / MANIFEST).exists()
    with pytest.raises(DataError, match="not a finished data build"):
        read_build_manifest(out)
    build_split(generated, SplitConfig(), out, engine=engine)
    assert read_build_manifest(out)["rows"]["train"] > 0
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".built.")] in (
        [],
        [".built.lock"],
    )


def _until(last: str, lines: Iterable[str]) -> Iterator[str]:
    """The lines up to the first that reads ``last`` (or to the end)."""
    for line in lines:
        yield line
        if line.strip() == last:
            return


def test_bad_input_is_named(engine, generated, tmp_path):
    with pytest.raises(ConfigError, match="reads data.source 'files'"):
        build_split(DataConfig(source="synthetic"), SplitConfig(), tmp_path / "a", engine=engine)
    roles = dataclasses.replace(generated.interactions, query_id="user")
    with pytest.raises(DataError, match=r"interactions.parquet: no column\(s\) \['user'\]"):
        build_split(
            dataclasses.replace(generated, interactions=roles),
            SplitConfig(),
            tmp_path / "b",
            engine=engine,
        )
    corrupt = tmp_path / "corrupt.parquet"
    corrupt.write_bytes(b"PAR1 not really")
    roles = dataclasses.replace(generated.interactions, path=corrupt)
    with pytest.raises(DataError, match="corrupt.parquet"):
        build_split(
            dataclasses.replace(generated, interactions=roles),
            SplitConfig(),
            tmp_path / "c",
            engine=engine,
        )
    assert not (tmp_path / "c").exists()
    parts = tmp_path / "parts"
    parts.mkdir()
    pq.write_table(pq.read_table(generated.interactions.path), parts / "a.parquet")
    pq.write_table(pq.read_table(generated.interactions.path).slice(0, 0), parts / "b.parquet")
    roles = dataclasses.replace(generated.interactions, path=parts)
    with pytest.raises(DataError, match=r"b.parquet: an empty Parquet file \(no rows\)"):
        build_split(
            dataclasses.replace(generated, interactions=roles),
            SplitConfig(),
            tmp_path / "d",
            engine=engine,
        )
    (parts / "b.parquet").write_bytes((parts / "a.parquet").read_bytes()[:300])  # truncated
    with pytest.raises(DataError, match=r"b.parquet: not a readable Parquet file"):
        build_split(
            dataclasses.replace(generated, interactions=roles),
            SplitConfig(),
            tmp_path / "d",
            engine=engine,
        )


OUT_OF_VOCABULARY = "<not in the training vocabulary>"


def _vocabulary_view(lists: list[list], trained: set) -> list[list]:
    """Built item-id lists as the model sees them: an id never trained on is out of
    the vocabulary (the stream maps it to the same code as in memory)."""
    return [[i if i is None or i in trained else OUT_OF_VOCABULARY for i in h] for h in lists]


def _in_memory_histories(data: DataConfig, split: SplitConfig, max_len: int, rule: str):
    """The in-memory training rows' histories and each query's valid / test histories,
    as item ids (None where a target was blanked), through ``TrainingData``."""
    import torch

    from twotower.features.pipeline import FeaturePipeline
    from twotower.features.specs import FeaturesConfig, HistoryFeature, IdFeature
    from twotower.training.examples import TrainingData

    dataset = load_dataset(data, {QUERY_ID: None}, {ITEM_ID: None})
    parts = split_interactions(dataset, split)
    features = FeaturesConfig(
        query=[HistoryFeature("history", QUERY_ID, "item_id", max_len=max_len)],
        item=[IdFeature("item_id", ITEM_ID)],
    )
    pipeline = FeaturePipeline.fit(features, dataset, parts.train)
    training = TrainingData(dataset, parts, pipeline, history=rule)
    ids = dataset.items[ITEM_ID].to_pylist()
    code_to_id = {int(c): ids[row] for row, c in enumerate(training.items["item_id"].tolist())}
    code_to_id[1] = OUT_OF_VOCABULARY  # items never trained on share the one code

    def as_ids(codes: torch.Tensor, length: int) -> list:
        return [code_to_id[c] if c else None for c in codes.tolist()[:length]]

    rows = training.batch(torch.arange(len(training))).query["history"]
    if rule == "mask_target":  # a row holds its query's whole history, a blank or not
        whole = training.queries["history"][training.query_idx]
        lengths = (whole > 0).sum(dim=1).tolist()
    else:
        lengths = (rows > 0).sum(dim=1).tolist()
    train = [as_ids(r, n) for r, n in zip(rows, lengths, strict=True)]
    queries = dataset.queries[QUERY_ID].to_pylist()
    latest = {}
    for part in ("valid", "test"):
        inputs = training.query_inputs(torch.arange(dataset.num_queries), part)["history"]
        latest[part] = {
            queries[q]: as_ids(inputs[q], int((inputs[q] > 0).sum()))
            for q in range(dataset.num_queries)
        }
    return train, latest


@pytest.mark.parametrize(
    ("method", "rule", "timestamps"),
    [("leave_last_out", "before_event", True), ("random", "mask_target", False)],
)
def test_histories_equal_the_in_memory_ones(
    engine, generated, tmp_path, method, rule, timestamps, splits
):
    data = generated
    if not timestamps:
        roles = dataclasses.replace(generated.interactions, timestamp=None)
        data = dataclasses.replace(generated, interactions=roles)
    histories = Histories({"history": 7}, rule)
    build_split(data, splits[method], tmp_path / "b", BuildOptions(threads=2), histories, engine)
    train, latest = _in_memory_histories(data, splits[method], 7, rule)
    read = pq.read_table(tmp_path / "b" / "train" / "part-00000.parquet")
    assert read["history"].to_pylist() == train
    assert any(None in h for h in train) == (rule == "mask_target")
    trained = set(pq.read_table(tmp_path / "b" / "train")[ITEM_ID].to_pylist())
    for part in ("valid", "test"):
        table = pq.read_table(tmp_path / "b" / f"queries_{part}.parquet")
        lists = _vocabulary_view(table["history"].to_pylist(), trained)
        got = dict(zip(table[QUERY_ID].to_pylist(), lists, strict=True))
        expected = {q: h for q, h in latest[part].items() if h}
        assert got == expected
        # each held-out row carries its query's history as of its own step
        rows = pq.read_table(tmp_path / "b" / f"{part}.parquet")
        lists = _vocabulary_view(rows["history"].to_pylist(), trained)
        assert lists == [latest[part][query] for query in rows[QUERY_ID].to_pylist()]
    seen = pq.read_table(tmp_path / "b" / "queries_test.parquet")
    memory = split_interactions(load_dataset(data), splits[method])
    known = pa.concat_tables([memory.train, memory.valid])
    pairs = sorted(set(zip(known[QUERY_ID].to_pylist(), known[ITEM_ID].to_pylist(), strict=True)))
    built_pairs = sorted(
        (q, i)
        for q, items in zip(seen[QUERY_ID].to_pylist(), seen["seen"].to_pylist(), strict=True)
        for i in items
    )
    assert built_pairs == pairs


COLUMNS = {"query": ["user_id", "segment", "age"], "item": ["item_id", "category", "price"]}


def test_feature_tables_are_joined_as_in_memory(engine, with_tables, tmp_path, splits):
    build_split(with_tables, splits["random"], tmp_path / "b", engine=engine, columns=COLUMNS)
    got = built(tmp_path / "b", ("user_id", "item_id", "timestamp"))
    dataset = load_dataset(with_tables, {"segment": None, "age": None}, {"category": None})
    assert got == in_memory(with_tables, splits["random"])
    users = {row["user_id"]: row for row in dataset.queries.to_pylist()}
    train = pq.read_table(tmp_path / "b" / "train" / "part-00000.parquet")
    assert train.column_names == ["user_id", "item_id", "timestamp", POSITION, "segment", "age"]
    for row in train.to_pylist():
        assert (row["segment"], row["age"]) == (
            users[row["user_id"]]["segment"],
            users[row["user_id"]]["age"],
        )
    items = pq.read_table(tmp_path / "b" / "items.parquet")
    expected = pq.read_table(with_tables.items.path, columns=["item_id", "category", "price"])
    assert items.to_pylist() == expected.to_pylist()


def test_ids_without_a_row_follow_on_missing_rows(engine, items_missing_rows, tmp_path, splits):
    data = items_missing_rows
    columns = {"item": ["i", "kind"]}
    with pytest.raises(
        DataError,
        match=r"log.csv: 2 item id\(s\) .* no row in .*items.csv "
        r"\(for example 7, 8\)",
    ):
        build_split(data, splits["random"], tmp_path / "a", engine=engine, columns=columns)
    for policy in ("drop", "impute"):
        config = dataclasses.replace(data, on_missing_rows=policy)
        out = tmp_path / policy
        build_split(config, splits["random"], out, engine=engine, columns=columns)
        assert built(out, ("u", "i", "t")) == in_memory(config, splits["random"])
        items = pq.read_table(out / "items.parquet").to_pylist()
        memory = load_dataset(config, item_columns={"kind": None}).items.to_pylist()
        assert items == memory


# the type each engine reads the item table's integer keys as, in its own spelling
INTEGER_KEYS = {"duckdb": "BIGINT", "spark": "int"}


def test_ids_of_another_type_are_named(engine, tmp_path, splits):
    from twotower.data.config import FeatureTableConfig

    (tmp_path / "log.csv").write_text("u,i\n1,10\n1,x7\n2,10\n")
    (tmp_path / "items.csv").write_text("i,kind\n10,a\n11,b\n")
    data = DataConfig(
        source="files",
        interactions=InteractionsConfig(tmp_path / "log.csv", query_id="u", item_id="i"),
        items=FeatureTableConfig(tmp_path / "items.csv", key="i"),
    )
    with pytest.raises(
        DataError,
        match=r"log.csv: interaction row 1 \(0-based\): i 'x7' does "
        rf"not convert to {INTEGER_KEYS[engine]}, the type of .*items.csv's keys",
    ):
        columns = {"item": ["i", "kind"]}
        build_split(data, splits["random"], tmp_path / "b", engine=engine, columns=columns)
    assert not (tmp_path / "b").exists()


def test_movielens_100k_histories_equal_the_in_memory_ones(engine, ml100k_files, tmp_path, splits):
    data = ml100k_files
    data = dataclasses.replace(
        data,
        interactions=dataclasses.replace(
            data.interactions,
            query_id=QUERY_ID,
            item_id=ITEM_ID,
            columns=[QUERY_ID, ITEM_ID, "rating", "ts"],
        ),
    )
    split = splits["leave_last_out"]
    build_split(data, split, tmp_path / "b", histories=Histories({"history": 20}), engine=engine)
    train, latest = _in_memory_histories(data, split, 20, "before_event")
    read = pq.read_table(tmp_path / "b" / "train" / "part-00000.parquet")
    assert read["history"].to_pylist() == train
    trained = set(pq.read_table(tmp_path / "b" / "train")[ITEM_ID].to_pylist())
    for part in ("valid", "test"):
        rows = pq.read_table(tmp_path / "b" / f"{part}.parquet")
        lists = _vocabulary_view(rows["history"].to_pylist(), trained)
        assert lists == [latest[part][q] for q in rows[QUERY_ID].to_pylist()]


@pytest.mark.skipif(not ML1M.is_dir(), reason=f"MovieLens-1M not found at {ML1M}")
def test_movielens_1m_split_equals_the_in_memory_one(engine, tmp_path):
    """configs/ml1m.yaml's protocol, ratings >= 3 and a per-user random 80/10/10, read
    from the '::'-separated file by the engine."""
    roles = InteractionsConfig(
        ML1M / "ratings_no_timestamps.dat",
        delimiter="::",
        header=False,
        columns=["user", "movie", "rating"],
        query_id="user",
        item_id="movie",
        weight="rating",
    )
    data = DataConfig(source="files", interactions=roles, min_weight=3)
    split = SplitConfig(method="random", ratios=[0.8, 0.1, 0.1], seed=0)
    build_split(data, split, tmp_path / "b", BuildOptions(threads=1), engine=engine)
    assert built(tmp_path / "b", ("user", "movie", "t")) == in_memory(data, split)


def test_ids_cast_to_the_keys_type_keep_the_split(engine, tmp_path, splits):
    """Integer ids in the log, text keys in the item table: the ids are cast, as in
    memory, and the rows keep their order (so the random split is the same)."""
    from twotower.data.config import FeatureTableConfig

    rows = "".join(f"{q},{(q * 5 + k) % 11}\n" for q in range(40) for k in range(3 + q % 7))
    (tmp_path / "log.csv").write_text("u,i\n" + rows)
    items = pa.table({"i": [str(i) for i in range(11)], "kind": [f"k{i % 3}" for i in range(11)]})
    pq.write_table(items, tmp_path / "items.parquet")
    data = DataConfig(
        source="files",
        interactions=InteractionsConfig(tmp_path / "log.csv", query_id="u", item_id="i"),
        items=FeatureTableConfig(tmp_path / "items.parquet", key="i"),
    )
    columns = {"item": ["i", "kind"]}
    build_split(data, splits["random"], tmp_path / "b", engine=engine, columns=columns)
    assert built(tmp_path / "b", ("u", "i", "t")) == in_memory(data, splits["random"])
    assert pq.read_table(tmp_path / "b" / "items.parquet").to_pylist() == items.to_pylist()


def test_names_holding_quotes_are_read_and_written(engine, tmp_path, splits):
    """Column names holding either dialect's identifier quote (``"`` and the backtick)
    are quoted by each engine itself, never rewritten."""
    from twotower.data.config import FeatureTableConfig

    user, item, segment, kind = 'u"ser', "it`em", 'se"g`ment', 'k`i"nd'
    rows = [(q, (q * 7 + k) % 13) for q in range(30) for k in range(4 + q % 5)]
    log = pa.table({user: [q for q, _ in rows], item: [i for _, i in rows]})
    users = pa.table({user: list(range(30)), segment: [f"s{q % 3}" for q in range(30)]})
    items = pa.table({item: list(range(13)), kind: [f"k{i % 4}" for i in range(13)]})
    for name, table in (("log", log), ("users", users), ("items", items)):
        pq.write_table(table, tmp_path / f"{name}.parquet")
    data = DataConfig(
        source="files",
        interactions=InteractionsConfig(tmp_path / "log.parquet", query_id=user, item_id=item),
        queries=FeatureTableConfig(tmp_path / "users.parquet", key=user),
        items=FeatureTableConfig(tmp_path / "items.parquet", key=item),
    )
    columns = {"query": [user, segment], "item": [item, kind]}
    histories = Histories({'h"is`tory': 3})
    out = tmp_path / "b"
    build_split(data, splits["random"], out, None, histories, engine, columns=columns)
    assert built(out, (user, item, "t")) == in_memory(data, splits["random"])
    train = pq.read_table(out / "train" / "part-00000.parquet")
    assert train.column_names == [user, item, POSITION, segment, 'h"is`tory']
    assert all(row[segment] == f"s{row[user] % 3}" for row in train.to_pylist())
    assert pq.read_table(out / "items.parquet").to_pylist() == items.to_pylist()
    queries = pq.read_table(out / "queries_test.parquet")
    assert queries.column_names[:3] == [user, segment, 'h"is`tory']
