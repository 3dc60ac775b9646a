"""The built-in generator's planted structure at scale, written as a Parquet stream.

``twotower data synth --interactions 20000000 --items 1000000 --out DIR`` writes:

    DIR/train/part-00000.parquet ...   training interactions, one row per event, with
                                       the user's features inline (user_id, segment,
                                       age, sessions) and item_id, timestamp
    DIR/valid.parquet, DIR/test.parquet  each user's second-to-last and last event
    DIR/items.parquet                  the corpus with its features

or, with ``raw``, the logs a user brings to ``twotower data build``: every event in
``DIR/interactions/``, the user table ``DIR/users.parquet`` and ``DIR/items.parquet``.

Users and items come from latent clusters exactly as in ``twotower.data.synthetic``,
and a user's affinity for an item is the same logit (strength x cosine + log
popularity). What changes is how a user's items are drawn, so that a million-item
corpus needs no users x items matrix: each user draws without replacement
(Gumbel-top-k) from a pool of ``pool`` candidates, half from the user's own cluster
and half by popularity, with the true logits over that pool. Users are generated in
blocks and written as they are made: memory holds the item arrays and one block.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm.auto import tqdm

from twotower.data.config import PlantedClusters
from twotower.data.synthetic import (
    draw_activity,
    draw_centres,
    draw_log_popularity,
    draw_timestamps,
    draw_vectors,
    item_columns,
    user_columns,
)

log = logging.getLogger(__name__)

ROWS_PER_FILE = 2_000_000
ROW_GROUP = 131_072
BLOCK_USERS = 4096


@dataclasses.dataclass(frozen=True)
class StreamSynthConfig(PlantedClusters):
    """Settings of the stream generator.

    Attributes:
        interactions: about this many interactions in all (train + valid + test).
        per_user: mean interactions per user (at least 5 each, at most ``pool / 2``).
        pool: candidates per user that the user's items are drawn from.
        num_items, num_clusters, affinity, popularity_exponent, seed: as in
            ``PlantedClusters`` (here 100,000 items in 64 clusters by default).
    """

    num_items: int = 100_000
    num_clusters: int = 64
    interactions: int = 1_000_000
    per_user: int = 50
    pool: int = 512

    def __post_init__(self) -> None:
        if self.per_user < 5 or self.per_user > self.pool // 2:
            raise ValueError(f"per_user must be in [5, pool / 2 = {self.pool // 2}]")
        if self.interactions < self.per_user or self.num_items < self.pool:
            raise ValueError("need interactions >= per_user and num_items >= pool")

    @property
    def num_users(self) -> int:
        """Users to generate: ``interactions // per_user``, at least one."""
        return max(1, self.interactions // self.per_user)


def write_synthetic_stream(
    config: StreamSynthConfig, out: Path, raw: bool = False
) -> dict[str, Path]:
    """Generates the data block by block and writes it under ``out``.

    Args:
        config: the generator's settings.
        out: the folder to write into; made if missing.
        raw: write raw logs instead, as users bring them to ``twotower data build``:
            ``interactions/part-*.parquet`` (every event: user_id, item_id,
            timestamp, unsplit), ``users.parquet`` (user_id, segment, age, sessions)
            and ``items.parquet``.

    Returns:
        The paths by role: ``train`` (a folder of parts), ``valid``, ``test`` and
        ``items``; raw: ``interactions``, ``users`` and ``items``.
    """
    rng = np.random.default_rng(config.seed)
    corpus = _Corpus.draw(rng, config)
    out = Path(out)
    rows_folder = out / ("interactions" if raw else "train")
    rows_folder.mkdir(parents=True, exist_ok=True)
    items = item_columns(rng, corpus.item_cluster, config.num_clusters, corpus.log_popularity)
    pq.write_table(pa.table(items), out / "items.parquet")

    writer = _PartWriter(rows_folder)
    users_writer: pq.ParquetWriter | None = None
    held_out: dict[str, list[pa.Table]] = {"valid": [], "test": []}
    users = config.num_users
    bar = tqdm(total=users * config.per_user, desc="synth", unit="row", unit_scale=True)
    for start in range(0, users, BLOCK_USERS):
        features, table, from_end = _user_block(
            rng, config, corpus, start, min(BLOCK_USERS, users - start)
        )
        if raw:
            writer.write(table.select(["user_id", "item_id", "timestamp"]))
            block = pa.table(features)
            users_writer = users_writer or pq.ParquetWriter(out / "users.parquet", block.schema)
            users_writer.write_table(block, row_group_size=ROW_GROUP)
        else:
            writer.write(table.filter(pa.array(from_end > 2)))
            held_out["test"].append(table.filter(pa.array(from_end == 1)))
            held_out["valid"].append(table.filter(pa.array(from_end == 2)))
        bar.update(table.num_rows)
    bar.close()
    writer.close()
    if users_writer is not None:
        users_writer.close()
    if raw:
        return {k: out / v for k, v in RAW_FILES.items()}
    paths = {"train": out / "train", "items": out / "items.parquet"}
    for part, tables in held_out.items():
        paths[part] = out / f"{part}.parquet"
        pq.write_table(pa.concat_tables(tables), paths[part])
    return paths


RAW_FILES = {"interactions": "interactions", "users": "users.parquet", "items": "items.parquet"}


@dataclasses.dataclass(frozen=True)
class _Corpus:
    """The items' latent side, indexed so that users' candidate pools are cheap to draw.

    Attributes:
        centres: (C, L) the clusters' centres.
        item_cluster: (N,) the cluster of each item.
        item_vectors: (N, L) each item's latent unit vector.
        log_popularity: (N,) each item's popularity term of the logits.
        by_cluster: (N,) the item indices ordered by cluster.
        cluster_start: (C + 1,) where each cluster's items begin in ``by_cluster``.
        popularity_cdf: (N,) the cumulative popularity share, in item order.
    """

    centres: np.ndarray
    item_cluster: np.ndarray
    item_vectors: np.ndarray
    log_popularity: np.ndarray
    by_cluster: np.ndarray
    cluster_start: np.ndarray
    popularity_cdf: np.ndarray

    @classmethod
    def draw(cls, rng: np.random.Generator, config: StreamSynthConfig) -> _Corpus:
        centres = draw_centres(rng, config.num_clusters)
        item_cluster = rng.integers(config.num_clusters, size=config.num_items)
        item_vectors = draw_vectors(rng, centres, item_cluster)
        log_pop = draw_log_popularity(rng, config.num_items, config.popularity_exponent)
        by_cluster = np.argsort(item_cluster, kind="stable")
        cluster_start = np.searchsorted(
            item_cluster[by_cluster], np.arange(config.num_clusters + 1)
        )
        popularity_cdf = np.cumsum(np.exp(log_pop - log_pop.max()))
        popularity_cdf /= popularity_cdf[-1]
        return cls(
            centres, item_cluster, item_vectors, log_pop, by_cluster, cluster_start, popularity_cdf
        )

    def pools(self, rng: np.random.Generator, user_cluster: np.ndarray, half: int) -> np.ndarray:
        """(U, 2 * half) each user's candidates, sorted: half of its cluster, half by popularity."""
        count = len(user_cluster)
        size = self.cluster_start[user_cluster + 1] - self.cluster_start[user_cluster]
        offset = (rng.random((count, half)) * np.maximum(size, 1)[:, None]).astype(np.int64)
        own = self.by_cluster[self.cluster_start[user_cluster, None] + offset]
        popular = np.searchsorted(self.popularity_cdf, rng.random((count, half)))
        pool = np.concatenate([own, popular], axis=1)
        return np.sort(np.minimum(pool, len(self.item_cluster) - 1), axis=1)


def _user_block(
    rng: np.random.Generator, config: StreamSynthConfig, corpus: _Corpus, start: int, count: int
) -> tuple[dict[str, pa.Array], pa.Table, np.ndarray]:
    """Draws one block of users' events, with each user's features inline.

    Returns the users' feature columns, the events as a table ordered by user, then
    time, and each event's place from its user's end (1: the last event).
    """
    user_cluster = rng.integers(config.num_clusters, size=count)
    user_vectors = draw_vectors(rng, corpus.centres, user_cluster)
    rows, items, per_user = _draw_events(rng, config, corpus, user_cluster, user_vectors)
    times = draw_timestamps(rng, len(rows))
    # sort each user's events by time; the last two are test and valid
    order = np.lexsort((times, rows))
    rows, items, times = rows[order], items[order], times[order]
    ends = np.searchsorted(rows, np.arange(count), side="right")
    position = np.arange(len(rows)) - np.repeat(ends - per_user, per_user)
    from_end = per_user[rows] - position  # 1: the last event
    features = user_columns(rng, user_cluster, config.num_clusters, per_user, start + 1)
    table = pa.table(
        {
            **{name: column.take(pa.array(rows)) for name, column in features.items()},
            "item_id": pa.array(items + 1),
            "timestamp": pa.array(times),
        }
    )
    return features, table, from_end


def _draw_events(
    rng: np.random.Generator,
    config: StreamSynthConfig,
    corpus: _Corpus,
    user_cluster: np.ndarray,
    user_vectors: np.ndarray,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Draws each user's items without replacement (Gumbel-top-k) from its pool.

    Returns (E,) each event's user, by place in the block, (E,) its item index and
    (U,) the events per user.
    """
    count, half = len(user_cluster), config.pool // 2
    pool = corpus.pools(rng, user_cluster, half)  # (U, P)
    logits = config.affinity * np.einsum("ud,upd->up", user_vectors, corpus.item_vectors[pool])
    logits += corpus.log_popularity[pool]
    # a pool may hold an item twice; the copy can never be drawn
    repeated = np.c_[np.zeros(count, bool), pool[:, 1:] == pool[:, :-1]]
    noisy = np.where(repeated, -np.inf, logits + rng.gumbel(size=logits.shape))
    per_user = draw_activity(rng, config.per_user, count, half)
    k = int(per_user.max())
    top = np.argpartition(-noisy, k - 1, axis=1)[:, :k]
    keep = np.arange(k) < per_user[:, None]
    rows = np.broadcast_to(np.arange(count)[:, None], top.shape)[keep]
    items = np.take_along_axis(pool, top, axis=1)[keep]
    return rows, items, per_user


class _PartWriter:
    """Writes tables into ``part-NNNNN.parquet`` files of about ``ROWS_PER_FILE`` rows."""

    def __init__(self, folder: Path) -> None:
        self.folder, self.part, self.rows, self.writer = folder, 0, 0, None

    def write(self, table: pa.Table) -> None:
        if self.writer is None:
            path = self.folder / f"part-{self.part:05d}.parquet"
            self.writer = pq.ParquetWriter(path, table.schema)
        self.writer.write_table(table, row_group_size=ROW_GROUP)
        self.rows += table.num_rows
        if self.rows >= ROWS_PER_FILE:
            self.close()
            self.part, self.rows = self.part + 1, 0

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None
