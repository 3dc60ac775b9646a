"""Adapters for the MovieLens datasets (GroupLens Research): each folder becomes a ``Dataset``.

Every file is read by ``read_table`` (vectorized pyarrow, precise errors) and every
result goes through ``Dataset.from_tables``. Interactions get the canonical columns
``query_id``, ``item_id`` and, where the file has them, ``timestamp`` (int64 Unix
seconds) and ``weight`` (float64, the rating). Users are keyed by ``user_id``,
movies by ``item_id``; an item's ``year`` is the "(1995)" at the end of its title
(float64, null when absent) and its ``genres`` one "|"-joined string ("" for none).
The search adapter's queries are normalized tag texts, keyed by ``query``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from twotower.data.config import TableSpec
from twotower.data.dataset import ITEM_ID, QUERY_ID, TIMESTAMP, WEIGHT, Dataset
from twotower.data.tables import read_table
from twotower.errors import DataError

USER_KEY = "user_id"
ITEM_KEY = "item_id"
# The search adapter's query key: the normalized query text itself.
SEARCH_QUERY_KEY = "query"

# u.genre's names in flag order, used when a 100K folder lacks u.genre.
GENRES_100K = (
    "unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime",
    "Documentary", "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery",
    "Romance", "Sci-Fi", "Thriller", "War", "Western",
)  # fmt: skip

# Rating files list these columns in this order; shorter variants drop them from the end.
_RATING_TYPES = {
    QUERY_ID: pa.int64(),
    ITEM_ID: pa.int64(),
    WEIGHT: pa.float64(),
    TIMESTAMP: pa.int64(),
}
_INTERACTION_ORDER = (QUERY_ID, ITEM_ID, TIMESTAMP, WEIGHT)
# ML-1M ratings files by preference, with how many of the rating columns each holds.
_ML1M_RATINGS = (("ratings.dat", 4), ("ratings_no_timestamps.dat", 3), ("user_movie_pairs.dat", 2))
_TITLE_YEAR = r"\((?P<year>\d{4})\)$"
_DATE_YEAR = r"(?P<year>\d{4})$"
_NO_GENRES = "(no genres listed)"


def load_movielens_100k(path: str | Path) -> Dataset:
    """Loads MovieLens 100K: ``u.data``, ``u.user``, ``u.item`` (and ``u.genre`` if present).

    Args:
        path: the folder holding the unpacked ``ml-100k`` files.

    Returns:
        Interactions with ``timestamp`` and ``weight``; users with age (float64),
        gender, occupation and zip; items with title, year (the title's, else the
        release date's) and genres from the 19 flags.

    Raises:
        DataError: a required file is missing or malformed.
    """
    path = Path(path)
    ratings = _read_headerless(path / "u.data", _RATING_TYPES, "\t")
    users = _read_headerless(
        path / "u.user",
        {
            USER_KEY: pa.int64(),
            "age": pa.float64(),
            "gender": pa.string(),
            "occupation": pa.string(),
            "zip": pa.string(),
        },
        "|",
    )
    return _dataset(_interactions(ratings), users, _items_100k(path), "movielens-100k")


def load_movielens_1m(path: str | Path) -> Dataset:
    """Loads MovieLens 1M: a ratings file, ``users.dat`` and ``movies.dat``.

    The ratings come from the first of ``ratings.dat`` (user, movie, rating,
    timestamp), ``ratings_no_timestamps.dat`` (no timestamp column in the result)
    and ``user_movie_pairs.dat`` (no timestamp and no weight) that exists.

    Args:
        path: the folder holding the unpacked ``ml-1m`` files.

    Returns:
        Interactions; users with gender, age (float64, the age-group code),
        occupation (the code as a string) and zip; items with title, year, genres.

    Raises:
        DataError: no ratings file, or a required file is missing or malformed.
    """
    path = Path(path)
    ratings = _read_headerless(*_ml1m_ratings_file(path), "::")
    users = _read_headerless(
        path / "users.dat",
        {
            USER_KEY: pa.int64(),
            "gender": pa.string(),
            "age": pa.float64(),
            "occupation": pa.string(),
            "zip": pa.string(),
        },
        "::",
    )
    movies = _read_headerless(
        path / "movies.dat",
        {ITEM_KEY: pa.int64(), "title": pa.string(), "genres": pa.string()},
        "::",
        encoding="latin-1",
    )
    return _dataset(_interactions(ratings), users, _movie_items(movies), "movielens-1m")


def load_movielens_latest_small(path: str | Path) -> Dataset:
    """Loads MovieLens latest-small: ``ratings.csv``, ``movies.csv`` and ``tags.csv`` if present.

    There is no user feature table. When ``tags.csv`` exists, each item gets
    ``tags``: its distinct lowercased tags, sorted and "|"-joined ("" for none).
    The tags were written by all users at all times, so they can leak a little of
    the future (and of test interactions) into item features; that is the
    dataset's nature. Tags on movies missing from ``movies.csv`` are ignored.

    Args:
        path: the folder holding the unpacked ``ml-latest-small`` files.

    Returns:
        Interactions with ``timestamp`` and ``weight``; items with title, year,
        genres ("" for "(no genres listed)") and, if tagged, tags.

    Raises:
        DataError: a required file is missing or malformed.
    """
    path = Path(path)
    ratings = read_table(
        TableSpec(path / "ratings.csv", format="csv"),
        types={
            "userId": pa.int64(),
            "movieId": pa.int64(),
            "rating": pa.float64(),
            "timestamp": pa.int64(),
        },
    ).table
    ratings = ratings.select(["userId", "movieId", "rating", "timestamp"])
    ratings = ratings.rename_columns(list(_RATING_TYPES))
    items = _latest_small_items(path)
    if (path / "tags.csv").exists():
        items = items.append_column("tags", _tags_per_item(path / "tags.csv", items[ITEM_KEY]))
    return _dataset(_interactions(ratings), None, items, "movielens-latest-small")


def load_movielens_latest_small_search(path: str | Path) -> Dataset:
    """Loads MovieLens latest-small as a search log: tag text as queries, movies as items.

    Each tag application in ``tags.csv`` is an interaction of the query ``normalize_query(tag)``
    with the movie it was applied to; empty tags are dropped, and so are tags on
    movies missing from ``movies.csv``. The same (query, movie) pair applied by
    several users, or in several spellings, is one interaction at its earliest
    timestamp: it is one relevance judgement, and keeping copies would put the same
    pair in train and in a held-out split. Interactions are in order of that earliest
    application (by timestamp, then by row in the file). ``ratings.csv`` is not read.

    Args:
        path: the folder holding the unpacked ``ml-latest-small`` files.

    Returns:
        Interactions with ``query_id`` (the normalized tag), ``item_id`` and
        ``timestamp``; queries keyed by ``query`` with ``text`` (the same string, for
        text features), one row per distinct normalized tag, sorted; items as in
        ``load_movielens_latest_small`` without ``tags`` (they are the queries).

    Raises:
        DataError: a required file is missing or malformed, or no tag is left.
    """
    path = Path(path)
    items = _latest_small_items(path)
    tags = read_table(
        TableSpec(path / "tags.csv", format="csv"),
        types={"movieId": pa.int64(), "tag": pa.string(), "timestamp": pa.int64()},
    ).table
    applied = pa.table(
        {
            QUERY_ID: normalize_query(tags["tag"]),
            ITEM_ID: tags["movieId"],
            TIMESTAMP: tags["timestamp"],
        }
    )
    applied = applied.filter(
        pc.and_(pc.not_equal(applied[QUERY_ID], ""), pc.is_in(applied[ITEM_ID], items[ITEM_KEY]))
    )
    interactions = _earliest_per_pair(applied)
    texts = pc.unique(interactions[QUERY_ID])
    texts = pc.take(texts, pc.sort_indices(texts))
    queries = pa.table({SEARCH_QUERY_KEY: texts, "text": texts})
    return Dataset.from_tables(
        interactions,
        queries,
        items,
        query_key=SEARCH_QUERY_KEY,
        item_key=ITEM_KEY,
        name="movielens-latest-small-search",
    )


def normalize_query(texts: pa.ChunkedArray | pa.Array) -> pa.ChunkedArray | pa.Array:
    """Query text as one key: Unicode NFKC, lower-cased, whitespace runs to one space, trimmed.

    Null becomes "". The same as Python's
    ``" ".join(unicodedata.normalize("NFKC", t).lower().split())`` except where Arrow's
    and Python's Unicode tables differ (characters one of them does not know yet, and
    "İ", which Arrow lower-cases to a plain "i").
    """
    texts = pc.utf8_lower(pc.utf8_normalize(pc.fill_null(texts, ""), "NFKC"))
    return pc.binary_join(pc.utf8_split_whitespace(pc.utf8_trim_whitespace(texts)), " ")


ADAPTERS: dict[str, Callable[[Path], Dataset]] = {
    "movielens-100k": load_movielens_100k,
    "movielens-1m": load_movielens_1m,
    "movielens-latest-small": load_movielens_latest_small,
    "movielens-latest-small-search": load_movielens_latest_small_search,
}


def _read_headerless(
    file: Path, types: Mapping[str, pa.DataType], delimiter: str, encoding: str = "utf-8"
) -> pa.Table:
    """Reads a file without a header whose columns are, in order, the keys of ``types``."""
    spec = TableSpec(
        file,
        format="csv",
        delimiter=delimiter,
        header=False,
        columns=list(types),
        encoding=encoding,
    )
    return read_table(spec, types=types).table


def _ml1m_ratings_file(path: Path) -> tuple[Path, dict[str, pa.DataType]]:
    """The preferred ML-1M ratings file that exists, and the rating columns it holds."""
    for name, n_columns in _ML1M_RATINGS:
        if (path / name).exists():
            return path / name, dict(list(_RATING_TYPES.items())[:n_columns])
    names = ", ".join(name for name, _ in _ML1M_RATINGS)
    raise DataError(f"{path}: no MovieLens 1M ratings file; expected one of {names}")


def _interactions(ratings: pa.Table) -> pa.Table:
    """The canonical interaction columns the ratings table has, in canonical order."""
    return ratings.select([c for c in _INTERACTION_ORDER if c in ratings.column_names])


def _dataset(interactions: pa.Table, users: pa.Table | None, items: pa.Table, name: str) -> Dataset:
    """Links the tables by the MovieLens keys (``user_id``, ``item_id``)."""
    return Dataset.from_tables(
        interactions, users, items, query_key=USER_KEY, item_key=ITEM_KEY, name=name
    )


def _items_100k(path: Path) -> pa.Table:
    """``u.item`` as item_id, title, year and genres (joined from the genre flags)."""
    genres = _genre_names_100k(path)
    flag_columns = [f"genre_{i}" for i in range(len(genres))]
    types = {
        ITEM_KEY: pa.int64(),
        "title": pa.string(),
        "release_date": pa.string(),
        "video_release_date": pa.string(),
        "imdb_url": pa.string(),
    } | dict.fromkeys(flag_columns, pa.int8())
    table = _read_headerless(path / "u.item", types, "|", encoding="latin-1")
    title = pc.utf8_trim_whitespace(table["title"])
    # The title's year is the film's; the release date is sometimes a later (video) one.
    year = pc.coalesce(_year(title, _TITLE_YEAR), _year(table["release_date"], _DATE_YEAR))
    flags = np.column_stack([table[c].to_numpy() for c in flag_columns])  # (N, G)
    return pa.table(
        {
            ITEM_KEY: table[ITEM_KEY],
            "title": title,
            "year": year,
            "genres": _genres_from_flags(flags, genres),
        }
    )


def _genre_names_100k(path: Path) -> list[str]:
    """The genre names in flag order, from ``u.genre`` (``name|index``) if it exists."""
    if not (path / "u.genre").exists():
        return list(GENRES_100K)
    table = _read_headerless(path / "u.genre", {"genre": pa.string(), "index": pa.int64()}, "|")
    return table.sort_by("index")["genre"].to_pylist()


def _genres_from_flags(flags: np.ndarray, names: Sequence[str]) -> pa.Array:
    """Joins the names of each row's set flags with "|" ("" for none).

    Args:
        flags: (N, G) 0/1 matrix, column g standing for ``names[g]``.
        names: the G genre names.

    Returns:
        N strings, each row's genres in column order.
    """
    # np.nonzero walks row by row, so each row's set flags are contiguous and in order.
    rows, cols = np.nonzero(flags)
    counts = np.bincount(rows, minlength=len(flags))
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int32)
    values = pc.take(pa.array(names, pa.string()), pa.array(cols))
    # Not binary_join_element_wise(null_handling="skip"): pyarrow 26 drops all-null rows.
    return pc.binary_join(pa.ListArray.from_arrays(pa.array(offsets), values), "|")


def _latest_small_items(path: Path) -> pa.Table:
    """``movies.csv`` as item_id, title, year and genres."""
    movies = read_table(
        TableSpec(path / "movies.csv", format="csv"),
        types={"movieId": pa.int64(), "title": pa.string(), "genres": pa.string()},
    ).table
    movies = movies.select(["movieId", "title", "genres"]).rename_columns(
        [ITEM_KEY, "title", "genres"]
    )
    return _movie_items(movies)


def _earliest_per_pair(applied: pa.Table) -> pa.Table:
    """One row per (query_id, item_id), its earliest; rows ordered by timestamp, then file row.

    Args:
        applied: ``query_id``, ``item_id``, ``timestamp`` rows in file order.
    """
    # sort_indices is stable, so equal timestamps keep their order in the file.
    chronological = applied.take(pc.sort_indices(applied, [(TIMESTAMP, "ascending")]))
    position = pa.array(np.arange(chronological.num_rows, dtype=np.int64))
    first = (
        chronological.append_column("position", position)
        .group_by([QUERY_ID, ITEM_ID])
        .aggregate([("position", "min")])["position_min"]
    )
    return chronological.take(np.sort(first.to_numpy()))


def _movie_items(movies: pa.Table) -> pa.Table:
    """item_id, title, genres (already "|"-joined) -> item_id, title, year, genres."""
    title = pc.utf8_trim_whitespace(movies["title"])
    genres = movies["genres"]
    genres = pc.if_else(pc.equal(genres, _NO_GENRES), "", genres)
    return pa.table(
        {
            ITEM_KEY: movies[ITEM_KEY],
            "title": title,
            "year": _year(title, _TITLE_YEAR),
            "genres": genres,
        }
    )


def _year(text: pa.ChunkedArray, pattern: str) -> pa.ChunkedArray:
    """The ``year`` group of ``pattern`` in each string, as float64 (null where absent)."""
    match = pc.extract_regex(text, pattern)
    return pc.cast(pc.struct_field(match, "year"), pa.float64())


def _tags_per_item(file: Path, item_ids: pa.ChunkedArray) -> pa.ChunkedArray:
    """Per item id, its distinct lowercased tags, sorted and "|"-joined ("" for none)."""
    tags = read_table(
        TableSpec(file, format="csv"), types={"movieId": pa.int64(), "tag": pa.string()}
    ).table
    tag = pc.utf8_lower(pc.utf8_trim_whitespace(tags["tag"]))
    pairs = pa.table({ITEM_KEY: tags["movieId"], "tag": tag}).filter(pc.not_equal(tag, ""))
    pairs = pairs.group_by([ITEM_KEY, "tag"]).aggregate([])  # distinct pairs
    pairs = pairs.sort_by([(ITEM_KEY, "ascending"), ("tag", "ascending")])
    # Single-threaded so that each list keeps the sorted order.
    per_item = pairs.group_by(ITEM_KEY, use_threads=False).aggregate([("tag", "list")])
    joined = pc.binary_join(per_item["tag_list"], "|")
    where = pc.index_in(item_ids, value_set=per_item[ITEM_KEY])
    return pc.fill_null(pc.take(joined, where), "")
