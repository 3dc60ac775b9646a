"""A synthetic dataset with a planted answer: the built-in data of the demo and the tests.

Queries (users) and items are drawn from latent clusters. Each has a latent vector
near its cluster's centre; a query's affinity for an item is their dot product
plus the item's log-popularity (a long tail). Interactions are sampled without
replacement from the softmax of those affinities, so a model that recovers the
clusters retrieves well and one that only counts popularity does not.

Every feature carries some of the cluster signal, through noise:
    query side: ``segment`` (a low-cardinality categorical), ``age`` (continuous,
    2% missing), ``sessions`` (a long-tailed count);
    item side: ``category`` (low-cardinality), ``price`` (continuous, 2% missing),
    ``views`` (a long-tailed count following popularity), ``genres`` (a multi-hot
    list like ``"g03|g07"``) and ``title`` (a short text of cluster-typical words).

The draws themselves (``draw_centres``, ``draw_vectors``, ``draw_log_popularity``,
``draw_activity``, ``draw_timestamps``) and the feature columns (``user_columns``,
``item_columns``) are public: ``twotower.data.synthetic_stream`` builds the same
structure at scale from them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from twotower.data.config import SyntheticConfig
from twotower.data.dataset import Dataset

_LATENT_DIM = 16
_NUM_GENRES = 18
_WORDS_PER_CLUSTER = 12
_START_TIME = 1_600_000_000  # seconds; the interactions span 180 days from here
_SPAN = 180 * 24 * 3600
_SYLLABLES = np.array(["ka", "lo", "mi", "ru", "ze", "to", "vi", "na", "pe", "sor", "dun", "qua"])


@dataclasses.dataclass(frozen=True)
class SyntheticData:
    """A generated dataset and its planted answer.

    Attributes:
        dataset: the tables, keys ``user_id`` and ``item_id``.
        query_cluster: (num_queries,) the cluster of each query, by query index.
        item_cluster: (num_items,) the cluster of each item, by item index.
        query_vectors: (num_queries, L) each query's latent unit vector.
        item_vectors: (num_items, L) each item's latent unit vector.
        log_popularity: (num_items,) each item's popularity term of the logits.
        strength: how strongly the latent vectors drive the choice (``affinity``).
    """

    dataset: Dataset
    query_cluster: np.ndarray
    item_cluster: np.ndarray
    query_vectors: np.ndarray
    item_vectors: np.ndarray
    log_popularity: np.ndarray
    strength: float

    def affinity(self, rows: np.ndarray | slice = slice(None)) -> np.ndarray:
        """(R, num_items) the true logits interactions were drawn from, for these query rows.

        Computed on demand: the whole matrix is num_queries x num_items.
        """
        return logits(
            self.query_vectors[rows], self.item_vectors, self.log_popularity, self.strength
        )


def logits(
    query_vectors: np.ndarray, item_vectors: np.ndarray, log_popularity: np.ndarray, strength: float
) -> np.ndarray:
    """(Q, N) strength * cosine + log popularity: the generator's true logits."""
    return strength * query_vectors @ item_vectors.T + log_popularity


def generate(config: SyntheticConfig) -> SyntheticData:
    """Draws a dataset from the config's latent clusters (deterministic given ``seed``)."""
    rng = np.random.default_rng(config.seed)
    centres = draw_centres(rng, config.num_clusters)
    query_cluster = rng.integers(config.num_clusters, size=config.num_queries)
    item_cluster = rng.integers(config.num_clusters, size=config.num_items)
    query_vec = draw_vectors(rng, centres, query_cluster)
    item_vec = draw_vectors(rng, centres, item_cluster)
    log_popularity = draw_log_popularity(rng, config.num_items, config.popularity_exponent)
    counts = draw_activity(rng, config.interactions_per_query, config.num_queries, config.num_items)

    def block_logits(rows: slice) -> np.ndarray:
        return logits(query_vec[rows], item_vec, log_popularity, config.affinity)

    query_idx, item_idx = _sample_interactions(rng, block_logits, counts, config.num_items)
    timestamps = draw_timestamps(rng, len(query_idx))
    interactions = pa.table(
        {
            "query_id": query_idx + 1,
            "item_id": item_idx + 1,
            "timestamp": timestamps,
        }
    )
    queries = pa.table(user_columns(rng, query_cluster, config.num_clusters, counts))
    items = pa.table(item_columns(rng, item_cluster, config.num_clusters, log_popularity))
    dataset = Dataset.from_tables(
        interactions, queries, items, query_key="user_id", item_key="item_id", name="synthetic"
    )
    return SyntheticData(
        dataset, query_cluster, item_cluster, query_vec, item_vec, log_popularity, config.affinity
    )


def write_parquet(dataset: Dataset, folder: Path) -> dict[str, Path]:
    """Writes the three tables as Parquet files; returns their paths by role."""
    folder.mkdir(parents=True, exist_ok=True)
    interactions = dataset.interactions.select(["query_id", "item_id", "timestamp"])
    interactions = interactions.rename_columns(["user_id", "item_id", "timestamp"])
    paths = {
        "interactions": folder / "interactions.parquet",
        "queries": folder / "users.parquet",
        "items": folder / "items.parquet",
    }
    pq.write_table(interactions, paths["interactions"])
    pq.write_table(dataset.queries, paths["queries"])
    pq.write_table(dataset.items, paths["items"])
    return paths


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def draw_centres(rng: np.random.Generator, num_clusters: int) -> np.ndarray:
    """Draws the clusters' centres: random unit vectors.

    Args:
        rng: the generator's random state (advanced).
        num_clusters: how many clusters, C.

    Returns:
        (C, L) one latent unit vector per cluster.
    """
    return _unit(rng.normal(size=(num_clusters, _LATENT_DIM)))


def draw_vectors(rng: np.random.Generator, centres: np.ndarray, cluster: np.ndarray) -> np.ndarray:
    """Draws a latent unit vector near its cluster's centre for each query or item.

    Args:
        rng: the generator's random state (advanced).
        centres: (C, L) the clusters' centres, from ``draw_centres``.
        cluster: (R,) the cluster of each row.

    Returns:
        (R, L) unit vectors: the centre plus Gaussian noise, normalized.
    """
    return _unit(centres[cluster] + 0.35 * rng.normal(size=(len(cluster), _LATENT_DIM)))


def draw_log_popularity(rng: np.random.Generator, num_items: int, exponent: float) -> np.ndarray:
    """Draws the items' popularity term of the logits: a Zipf tail over a random ranking.

    Args:
        rng: the generator's random state (advanced).
        num_items: how many items, N.
        exponent: the Zipf exponent (``popularity_exponent``).

    Returns:
        (N,) ``-exponent * log(rank)``, ranks 1..N in random order.
    """
    return -exponent * np.log(rng.permutation(num_items) + 1)


def draw_activity(rng: np.random.Generator, mean: int, size: int, most: int) -> np.ndarray:
    """Draws interactions per query: at least 5, long-tailed, mean about ``mean``.

    Args:
        rng: the generator's random state (advanced).
        mean: the mean interactions per query (at least 5).
        size: how many queries, Q.
        most: the cap on any one query's count.

    Returns:
        (Q,) int64 counts in [5, most] (``most`` at least 5).
    """
    extra_mean = mean - 5
    extra = rng.lognormal(np.log(max(extra_mean, 1e-9)) - 0.5, 1.0, size=size)
    counts = 5 + np.round(extra if extra_mean > 0 else 0 * extra).astype(np.int64)
    return np.minimum(counts, most)


def draw_timestamps(rng: np.random.Generator, count: int) -> np.ndarray:
    """Draws event times, uniform over 180 days and independent of the sampling order.

    Args:
        rng: the generator's random state (advanced).
        count: how many events, E.

    Returns:
        (E,) integer seconds from 1,600,000,000.
    """
    return _START_TIME + rng.integers(0, _SPAN, size=count)


def _sample_interactions(
    rng: np.random.Generator,
    block_logits: Callable[[slice], np.ndarray],
    counts: np.ndarray,
    num_items: int,
    max_logits: int = 2**25,
) -> tuple[np.ndarray, np.ndarray]:
    """Samples ``counts[q]`` distinct items per query from softmax(logits[q]).

    Uses the Gumbel-top-k trick: the top k of logits + Gumbel noise is a sample of k
    items without replacement, vectorized over a block of queries at a time. Blocks
    hold at most 4096 queries and about ``max_logits`` logits, so memory stays
    bounded for any corpus size; the noise is drawn in row order, so the sample does
    not depend on the block size.
    """
    num_queries = len(counts)
    step = max(1, min(4096, max_logits // num_items))
    k_max = int(counts.max())
    query_idx, item_idx = [], []
    for start in range(0, num_queries, step):
        block = block_logits(slice(start, start + step))  # (step, N)
        noisy = block + rng.gumbel(size=block.shape)
        top = np.argpartition(-noisy, k_max - 1, axis=1)[:, :k_max]
        order = np.argsort(-np.take_along_axis(noisy, top, axis=1), axis=1, kind="stable")
        top = np.take_along_axis(top, order, axis=1)
        keep = np.arange(k_max) < counts[start : start + step, None]
        rows = np.broadcast_to(np.arange(start, start + len(block))[:, None], top.shape)
        query_idx.append(rows[keep])
        item_idx.append(top[keep])
    return np.concatenate(query_idx), np.concatenate(item_idx)


def _noisy_label(rng: np.random.Generator, cluster: np.ndarray, levels: int, noise: float):
    """A categorical that equals ``cluster % levels`` except for a ``noise`` fraction."""
    label = cluster % levels
    flip = rng.random(len(cluster)) < noise
    return np.where(flip, rng.integers(levels, size=len(cluster)), label)


def _with_missing(rng: np.random.Generator, values: np.ndarray, rate: float) -> pa.Array:
    return pa.array(values, mask=rng.random(len(values)) < rate)


def user_columns(
    rng: np.random.Generator,
    cluster: np.ndarray,
    num_clusters: int,
    counts: np.ndarray,
    first_id: int = 1,
) -> dict[str, pa.Array]:
    """Draws the user table's columns for users of these clusters and interaction counts.

    Args:
        rng: the generator's random state (advanced).
        cluster: (U,) the cluster of each user.
        num_clusters: how many clusters there are (spreads ``age`` over them).
        counts: (U,) each user's interactions (``sessions`` follows it).
        first_id: the ``user_id`` of the first user; the rest count up from it.

    Returns:
        The columns by name: ``user_id``, ``segment``, ``age`` and ``sessions``.
    """
    segment = _noisy_label(rng, cluster, 4, 0.2)
    age = 22 + 35 * cluster / max(num_clusters - 1, 1) + rng.normal(0, 5, len(cluster))
    sessions = np.round(counts * rng.lognormal(0.5, 0.8, len(cluster))).astype(np.int64)
    return {
        "user_id": pa.array(np.arange(first_id, first_id + len(cluster))),
        "segment": pc.take(pa.array(["a", "b", "c", "d"]), pa.array(segment)),
        "age": _with_missing(rng, np.round(age, 1), 0.02),
        "sessions": pa.array(sessions),
    }


def item_columns(
    rng: np.random.Generator, cluster: np.ndarray, num_clusters: int, log_popularity: np.ndarray
) -> dict[str, pa.Array]:
    """Draws the item table's columns for items of these clusters and popularity.

    Args:
        rng: the generator's random state (advanced).
        cluster: (N,) the cluster of each item.
        num_clusters: how many clusters there are (sizes the title vocabulary).
        log_popularity: (N,) each item's popularity term, from ``draw_log_popularity``.

    Returns:
        The columns by name: ``item_id`` (1..N), ``category``, ``price``, ``views``,
        ``genres`` and ``title``.
    """
    n = len(cluster)
    category = _noisy_label(rng, cluster, 5, 0.2)
    price = np.exp(2 + 0.3 * (cluster % 4) + rng.normal(0, 0.4, n))
    scale = np.exp(log_popularity - log_popularity.min())
    views = np.round(scale * rng.lognormal(2.0, 0.5, n)).astype(np.int64)
    return {
        "item_id": pa.array(np.arange(1, n + 1)),
        "category": pc.take(pa.array([f"c{i}" for i in range(5)]), pa.array(category)),
        "price": _with_missing(rng, np.round(price, 2), 0.02),
        "views": pa.array(views),
        "genres": _genres(rng, cluster),
        "title": _titles(rng, cluster, num_clusters),
    }


def _joined(words: np.ndarray, keep: np.ndarray, separator: str) -> pa.Array:
    """Joins the kept words of each row into one string, vectorized with Arrow lists."""
    counts = keep.sum(axis=1)
    offsets = np.r_[0, np.cumsum(counts)].astype(np.int32)
    values = pa.array(words[keep])
    if isinstance(values, pa.ChunkedArray):  # pyarrow chunks large numpy string arrays
        values = values.combine_chunks()
    lists = pa.ListArray.from_arrays(pa.array(offsets), values)
    return pc.binary_join(lists, separator)


def _genres(rng: np.random.Generator, cluster: np.ndarray) -> pa.Array:
    """1-3 genres per item, mostly from its cluster's three typical genres."""
    n = len(cluster)
    typical = (3 * cluster[:, None] + np.arange(3)) % _NUM_GENRES  # (n, 3)
    picks = np.where(rng.random((n, 3)) < 0.85, typical, rng.integers(_NUM_GENRES, size=(n, 3)))
    keep = np.arange(3) < rng.integers(1, 4, size=n)[:, None]
    names = np.array([f"g{i:02d}" for i in range(_NUM_GENRES)])
    # A genre drawn twice for one item is kept once.
    picks = np.sort(picks, axis=1)
    keep &= np.c_[np.ones(n, bool), picks[:, 1:] != picks[:, :-1]]
    return _joined(names[picks], keep, "|")


def _titles(rng: np.random.Generator, cluster: np.ndarray, num_clusters: int) -> pa.Array:
    """2-4 words per title, each from its cluster's word pool 80% of the time."""
    n = len(cluster)
    vocabulary = _words(num_clusters * _WORDS_PER_CLUSTER)
    own = cluster[:, None] * _WORDS_PER_CLUSTER + rng.integers(_WORDS_PER_CLUSTER, size=(n, 4))
    any_word = rng.integers(len(vocabulary), size=(n, 4))
    picks = np.where(rng.random((n, 4)) < 0.8, own, any_word)
    keep = np.arange(4) < rng.integers(2, 5, size=n)[:, None]
    return _joined(vocabulary[picks], keep, " ")


def _words(count: int) -> np.ndarray:
    """``count`` distinct made-up words, e.g. ``"kalomi"`` (three syllables each)."""
    s = len(_SYLLABLES)
    i = (np.arange(count) * 577) % s**3  # 577 is prime to 12**3: distinct, well spread
    parts = [_SYLLABLES[(i // s**p) % s] for p in range(3)]
    return np.char.add(np.char.add(parts[0], parts[1]), parts[2])
