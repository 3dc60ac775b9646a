"""The latest-small search adapter: tag texts as queries, movies as items."""

from __future__ import annotations

import csv
import unicodedata
from pathlib import Path

import pyarrow as pa
import pytest

from twotower.data.config import DataConfig
from twotower.data.load import load_dataset
from twotower.data.movielens import (
    ADAPTERS,
    load_movielens_latest_small,
    load_movielens_latest_small_search,
    normalize_query,
)
from twotower.errors import DataError

# The datasets live beside the repository (../shared/datasets), never inside it.
REPO_ROOT = Path(__file__).resolve().parents[2]
DATASETS = REPO_ROOT.parent / "shared" / "datasets"


def _python_normalized(text: str) -> str:
    """The slow, obvious oracle for ``normalize_query``."""
    return " ".join(unicodedata.normalize("NFKC", text).lower().split())


def _write(path: Path, lines: list[str]) -> None:
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")


@pytest.fixture
def ml_latest(tmp_path: Path) -> Path:
    _write(
        tmp_path / "movies.csv",
        [
            "movieId,title,genres",
            '1,"Café, The (1995)",Adventure|Comedy',
            "2,Cosmos,(no genres listed)",
            "3,Heat (1995) ,Action",
        ],
    )
    _write(
        tmp_path / "tags.csv",
        [
            "userId,movieId,tag,timestamp",
            "2,1,Pixar,1445714994",
            '3,1,"  PIXAR ",1445714990',  # the same pair, earlier: its timestamp is kept
            "4,3,Heist   Movie,1445714995",
            '5,3,"heist\tmovie",1445714999',  # the same pair, later: dropped
            '5,2,"",1445714996',  # empty
            '6,2,"   ",1445714996',  # empty once trimmed
            "7,2,Ｐｉｘａｒ,1445714997",  # full-width letters: NFKC makes them "Pixar"
            "8,99,pixar,1445714998",  # movie 99 is not in movies.csv
            "9,1,heist movie,1445714990",  # ties with the earlier "pixar": file order
        ],
    )
    return tmp_path


def test_interactions_are_normalized_and_deduplicated(ml_latest: Path) -> None:
    interactions = load_movielens_latest_small_search(ml_latest).interactions
    assert interactions.column_names == [
        "query_id",
        "item_id",
        "timestamp",
        "query_idx",
        "item_idx",
    ]
    assert interactions.schema.field("timestamp").type == pa.int64()
    # One row per (query, movie) at its earliest timestamp, oldest first.
    assert interactions.select(["query_id", "item_id", "timestamp"]).to_pydict() == {
        "query_id": ["pixar", "heist movie", "heist movie", "pixar"],
        "item_id": [1, 1, 3, 2],
        "timestamp": [1445714990, 1445714990, 1445714995, 1445714997],
    }
    assert interactions["query_idx"].to_pylist() == [1, 0, 0, 1]
    assert interactions["item_idx"].to_pylist() == [0, 0, 2, 1]


def test_queries_and_items(ml_latest: Path) -> None:
    dataset = load_movielens_latest_small_search(ml_latest)
    assert dataset.query_key == "query"
    assert dataset.item_key == "item_id"
    assert dataset.name == "movielens-latest-small-search"
    assert dataset.queries.to_pydict() == {
        "query": ["heist movie", "pixar"],
        "text": ["heist movie", "pixar"],
    }
    assert dataset.items.to_pydict() == {
        "item_id": [1, 2, 3],
        "title": ["Café, The (1995)", "Cosmos", "Heat (1995)"],
        "year": [1995.0, None, 1995.0],
        "genres": ["Adventure|Comedy", "", "Action"],
    }
    # The same movies as the ratings adapter, less the tags (here they are the queries).
    _write(ml_latest / "ratings.csv", ["userId,movieId,rating,timestamp", "1,1,4.0,964982703"])
    assert dataset.items.equals(load_movielens_latest_small(ml_latest).items.drop_columns("tags"))


def test_normalize_query_matches_python() -> None:
    texts = [
        "  Dark   Comedy ",
        "dark\tcomedy\n",
        "DARK\u00a0COMEDY",  # no-break space
        "Ｄａｒｋ\u3000comedy",  # full-width letters and space
        "Cafe\u0301",  # "e" + combining acute: NFKC composes it
        "ﬁlm noir",  # the "fi" ligature
        "",
        " \t ",
        "Sci-Fi (1970s)",
    ]
    assert normalize_query(pa.array(texts)).to_pylist() == [_python_normalized(t) for t in texts]
    assert normalize_query(pa.array(["A", None])).to_pylist() == ["a", ""]


def test_registered_as_an_adapter(ml_latest: Path) -> None:
    assert ADAPTERS["movielens-latest-small-search"] is load_movielens_latest_small_search
    dataset = load_dataset(DataConfig(source="movielens-latest-small-search", path=ml_latest))
    assert dataset.interactions.num_rows == 4


def test_only_empty_tags_is_an_error(ml_latest: Path) -> None:
    _write(ml_latest / "tags.csv", ["userId,movieId,tag,timestamp", '1,1," ",1445714990'])
    with pytest.raises(DataError, match="no rows"):
        load_movielens_latest_small_search(ml_latest)


def test_missing_tags_file_is_named(ml_latest: Path) -> None:
    (ml_latest / "tags.csv").unlink()
    with pytest.raises(DataError, match="tags.csv"):
        load_movielens_latest_small_search(ml_latest)


# ---- the real files ----------------------------------------------------------------------


def test_real_latest_small_search() -> None:
    path = DATASETS / "ml-latest-small"
    if not path.is_dir():
        pytest.skip(
            f"MovieLens files not found at {path}; "
            "they live in ../shared/datasets beside the project"
        )
    # The oracle: plain csv, Python's own normalization, a dict of earliest timestamps.
    with open(path / "tags.csv", encoding="utf-8", newline="") as file:
        rows = list(csv.DictReader(file))
    assert len(rows) == 3_683
    earliest: dict[tuple[str, int], int] = {}
    for row in rows:
        query = _python_normalized(row["tag"])
        if query:
            pair = (query, int(row["movieId"]))
            earliest[pair] = min(earliest.get(pair, int(row["timestamp"])), int(row["timestamp"]))

    dataset = load_movielens_latest_small_search(path)
    interactions = dataset.interactions.to_pydict()
    adapter = {
        (query, item): timestamp
        for query, item, timestamp in zip(
            interactions["query_id"],
            interactions["item_id"],
            interactions["timestamp"],
            strict=True,
        )
    }
    assert len(adapter) == dataset.interactions.num_rows  # no pair twice
    assert adapter == earliest
    assert dataset.queries["query"].to_pylist() == sorted({query for query, _ in earliest})
    assert dataset.queries["query"].equals(dataset.queries["text"])
    assert dataset.num_items == 9_742
    # The counts the oracle gives today, pinned so that a change to either side shows.
    assert (len(earliest), dataset.num_queries) == (3_574, 1_475)
