"""MovieLens adapters: tiny generated files in each exact format, then the real datasets."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest

from twotower.data.movielens import (
    ADAPTERS,
    GENRES_100K,
    load_movielens_1m,
    load_movielens_100k,
    load_movielens_latest_small,
    load_movielens_latest_small_search,
)
from twotower.errors import DataError

# The datasets live beside the repository (../shared/datasets), never inside it.
REPO_ROOT = Path(__file__).resolve().parents[2]
DATASETS = REPO_ROOT.parent / "shared" / "datasets"


def _write(path: Path, lines: list[str], encoding: str = "utf-8") -> None:
    path.write_bytes("".join(line + "\n" for line in lines).encode(encoding))


def _flags(*genres: str) -> str:
    """The 19 u.item genre flags with ``genres`` set."""
    return "|".join("1" if name in genres else "0" for name in GENRES_100K)


# ---- ML-100K, generated ------------------------------------------------------------------


@pytest.fixture
def ml_100k(tmp_path: Path) -> Path:
    _write(
        tmp_path / "u.data", ["1\t10\t4\t881250949", "2\t20\t5\t881250950", "1\t20\t3\t881250951"]
    )
    _write(tmp_path / "u.user", ["1|24|M|technician|85711", "2|53|F|other|T8H1N"])
    _write(
        tmp_path / "u.item",
        [
            f"10|Café Society (1995)|01-Jan-1995||http://a|{_flags('Animation', 'Comedy')}",
            f"20|No Genre Film |22-Jan-1996||http://b|{_flags()}",
            f"30|Twelve Monkeys (1995)|22-Jan-1996||http://c|{_flags('Drama', 'Sci-Fi')}",
            f"40|unknown||||{_flags('unknown')}",
        ],
        encoding="latin-1",
    )
    _write(tmp_path / "u.genre", [f"{name}|{i}" for i, name in enumerate(GENRES_100K)] + [""])
    return tmp_path


def test_100k_interactions(ml_100k: Path) -> None:
    interactions = load_movielens_100k(ml_100k).interactions
    assert interactions.column_names[:4] == ["query_id", "item_id", "timestamp", "weight"]
    assert interactions.schema.field("timestamp").type == pa.int64()
    assert interactions.schema.field("weight").type == pa.float64()
    assert interactions["query_id"].to_pylist() == [1, 2, 1]
    assert interactions["item_id"].to_pylist() == [10, 20, 20]
    assert interactions["timestamp"].to_pylist() == [881250949, 881250950, 881250951]
    assert interactions["weight"].to_pylist() == [4.0, 5.0, 3.0]


def test_100k_users(ml_100k: Path) -> None:
    users = load_movielens_100k(ml_100k).queries
    assert users.schema.field("age").type == pa.float64()
    assert users.to_pydict() == {
        "user_id": [1, 2],
        "age": [24.0, 53.0],
        "gender": ["M", "F"],
        "occupation": ["technician", "other"],
        "zip": ["85711", "T8H1N"],
    }


def test_100k_items(ml_100k: Path) -> None:
    assert b"\xe9" in (ml_100k / "u.item").read_bytes()  # latin-1, not UTF-8
    items = load_movielens_100k(ml_100k).items
    assert items.to_pydict() == {
        "item_id": [10, 20, 30, 40],
        "title": ["Café Society (1995)", "No Genre Film", "Twelve Monkeys (1995)", "unknown"],
        # The title's year wins over the release date's; the date fills in when the title has none.
        "year": [1995.0, 1996.0, 1995.0, None],
        "genres": ["Animation|Comedy", "", "Drama|Sci-Fi", "unknown"],
    }


def test_100k_without_u_genre_uses_the_standard_names(ml_100k: Path) -> None:
    with_file = load_movielens_100k(ml_100k).items
    (ml_100k / "u.genre").unlink()
    assert load_movielens_100k(ml_100k).items.equals(with_file)


def test_100k_missing_file_is_named(ml_100k: Path) -> None:
    (ml_100k / "u.user").unlink()
    with pytest.raises(DataError, match="u.user"):
        load_movielens_100k(ml_100k)


# ---- ML-1M, generated --------------------------------------------------------------------

_ML1M_VARIANTS = {
    "ratings.dat": ["1::20::5::978300760", "2::10::3::978302109"],
    "ratings_no_timestamps.dat": ["1::20::5", "2::10::3"],
    "user_movie_pairs.dat": ["1::20", "2::10"],
}


@pytest.fixture
def ml_1m(tmp_path: Path) -> Path:
    _write(tmp_path / "users.dat", ["1::F::1::10::48067", "2::M::56::16::70072-1234"])
    _write(
        tmp_path / "movies.dat",
        [
            "10::Café au Lait (1993)::Comedy",
            "20::Toy Story (1995)::Animation|Children's|Comedy",
            "30::Untitled::Drama",
        ],
        encoding="latin-1",
    )
    return tmp_path


@pytest.mark.parametrize(
    ("file", "columns"),
    [
        ("ratings.dat", ["query_id", "item_id", "timestamp", "weight"]),
        ("ratings_no_timestamps.dat", ["query_id", "item_id", "weight"]),
        ("user_movie_pairs.dat", ["query_id", "item_id"]),
    ],
)
def test_1m_interaction_variants(ml_1m: Path, file: str, columns: list[str]) -> None:
    _write(ml_1m / file, _ML1M_VARIANTS[file])
    interactions = load_movielens_1m(ml_1m).interactions
    assert interactions.select(columns).column_names == columns
    assert not set(interactions.column_names) - set(columns) - {"query_idx", "item_idx"}
    expected = {
        "query_id": [1, 2],
        "item_id": [20, 10],
        "timestamp": [978300760, 978302109],
        "weight": [5.0, 3.0],
    }
    assert interactions.select(columns).to_pydict() == {c: expected[c] for c in columns}


def test_1m_prefers_ratings_with_timestamps(ml_1m: Path) -> None:
    for file, lines in _ML1M_VARIANTS.items():
        _write(ml_1m / file, lines)
    assert load_movielens_1m(ml_1m).has_timestamps


def test_1m_without_ratings_names_the_accepted_files(ml_1m: Path) -> None:
    with pytest.raises(DataError) as caught:
        load_movielens_1m(ml_1m)
    message = str(caught.value)
    assert str(ml_1m) in message
    assert all(file in message for file in _ML1M_VARIANTS)


def test_1m_users_and_items(ml_1m: Path) -> None:
    assert b"\xe9" in (ml_1m / "movies.dat").read_bytes()
    _write(ml_1m / "ratings.dat", _ML1M_VARIANTS["ratings.dat"])
    dataset = load_movielens_1m(ml_1m)
    assert dataset.queries.to_pydict() == {
        "user_id": [1, 2],
        "gender": ["F", "M"],
        "age": [1.0, 56.0],
        "occupation": ["10", "16"],
        "zip": ["48067", "70072-1234"],
    }
    assert dataset.items.to_pydict() == {
        "item_id": [10, 20, 30],
        "title": ["Café au Lait (1993)", "Toy Story (1995)", "Untitled"],
        "year": [1993.0, 1995.0, None],
        "genres": ["Comedy", "Animation|Children's|Comedy", "Drama"],
    }


def test_1m_missing_movies_file_is_named(ml_1m: Path) -> None:
    _write(ml_1m / "ratings.dat", _ML1M_VARIANTS["ratings.dat"])
    (ml_1m / "movies.dat").unlink()
    with pytest.raises(DataError, match="movies.dat"):
        load_movielens_1m(ml_1m)


# ---- latest-small, generated -------------------------------------------------------------


@pytest.fixture
def ml_latest(tmp_path: Path) -> Path:
    _write(
        tmp_path / "ratings.csv",
        ["userId,movieId,rating,timestamp", "1,1,4.0,964982703", "5,2,0.5,964981247"],
    )
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
            "3,1,funny ,1445714995",
            "4,1,pixar,1445714996",
            "5,1,Funny,1445714997",
            "2,3,heist,1445714998",
            "2,99,not in movies,1445714999",
        ],
    )
    return tmp_path


def test_latest_small_interactions_and_users(ml_latest: Path) -> None:
    dataset = load_movielens_latest_small(ml_latest)
    columns = ["query_id", "item_id", "timestamp", "weight"]
    assert dataset.interactions.select(columns).to_pydict() == {
        "query_id": [1, 5],
        "item_id": [1, 2],
        "timestamp": [964982703, 964981247],
        "weight": [4.0, 0.5],
    }
    assert dataset.queries.to_pydict() == {"user_id": [1, 5]}


def test_latest_small_items_and_tags(ml_latest: Path) -> None:
    items = load_movielens_latest_small(ml_latest).items
    assert items.to_pydict() == {
        "item_id": [1, 2, 3],
        "title": ["Café, The (1995)", "Cosmos", "Heat (1995)"],
        "year": [1995.0, None, 1995.0],
        "genres": ["Adventure|Comedy", "", "Action"],
        "tags": ["funny|pixar", "", "heist"],
    }


def test_latest_small_without_tags_has_no_tags_column(ml_latest: Path) -> None:
    (ml_latest / "tags.csv").unlink()
    assert load_movielens_latest_small(ml_latest).items.column_names == [
        "item_id",
        "title",
        "year",
        "genres",
    ]


def test_adapters_by_name() -> None:
    expected = {
        "movielens-100k": load_movielens_100k,
        "movielens-1m": load_movielens_1m,
        "movielens-latest-small": load_movielens_latest_small,
        "movielens-latest-small-search": load_movielens_latest_small_search,
    }
    assert expected == ADAPTERS


# ---- the real files ----------------------------------------------------------------------


def _real(folder: str) -> Path:
    path = DATASETS / folder
    if not path.is_dir():
        pytest.skip(
            f"MovieLens files not found at {path}; "
            "they live in ../shared/datasets beside the project"
        )
    return path


def test_real_100k() -> None:
    dataset = load_movielens_100k(_real("ml-100k"))
    assert dataset.interactions.num_rows == 100_000
    assert (dataset.num_queries, dataset.num_items) == (943, 1_682)
    timestamps = dataset.column("timestamp")
    assert (timestamps.min(), timestamps.max()) == (874724710, 893286638)
    toy_story = dataset.items.filter(pc.equal(dataset.items["item_id"], 1))
    assert toy_story.to_pylist()[0] == {
        "item_id": 1,
        "title": "Toy Story (1995)",
        "year": 1995.0,
        "genres": "Animation|Children's|Comedy",
    }


def test_real_1m() -> None:
    dataset = load_movielens_1m(_real("ml-1m"))
    assert dataset.interactions.num_rows == 1_000_209
    assert not dataset.has_timestamps
    assert dataset.num_queries == 6_040
    assert len(np.unique(dataset.column("item_id"))) == 3_706
    assert dataset.num_items == 3_883
    first = dataset.interactions.slice(0, 1).select(["query_id", "item_id", "weight"])
    assert first.to_pylist() == [{"query_id": 1, "item_id": 1193, "weight": 5.0}]
    user_1 = dataset.queries.filter(pc.equal(dataset.queries["user_id"], 1))
    assert user_1["gender"].to_pylist() == ["F"]


def test_real_latest_small() -> None:
    dataset = load_movielens_latest_small(_real("ml-latest-small"))
    assert dataset.interactions.num_rows == 100_836
    assert dataset.num_queries == 610
    assert dataset.num_items == 9_742
    assert len(np.unique(dataset.column("item_id"))) == 9_724
