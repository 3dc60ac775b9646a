"""The built-in generator's planted structure at scale, written as a Parquet stream.

``twotower data synth --interactions 20000000 --items 1000000 --out DIR`` writes:

    DIR/train/part-00000.parquet ...   training interactions, one row per event, with
                                       the user's features inline (user_id, segment,
                                       age, sessions) and item_id, timestamp
    DIR/valid.parquet, DIR/test.parquet  each user's second-to-last and last event
    DIR/items.parquet                  the corpus with its features

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

from twotower.data.synthetic import (
    _LATENT_DIM,
    _SPAN,
    _START_TIME,
    SyntheticConfig,
    _item_table,
    _unit,
    user_columns,
)

log = logging.getLogger(__name__)

ROWS_PER_FILE = 2_000_000
ROW_GROUP = 131_072
BLOCK_USERS = 4096


@dataclasses.dataclass(frozen=True)
class StreamSynthConfig:
    """Settings of the stream generator.

    Attributes:
        interactions: about this many interactions in all (train + valid + test).
        num_items: the corpus size.
        per_user: mean interactions per user (at least 5 each, at most ``pool / 2``).
        num_clusters: latent clusters.
        pool: candidates per user that the user's items are drawn from.
        affinity, popularity_exponent, seed: as in ``SyntheticConfig``.
    """

    interactions: int = 1_000_000
    num_items: int = 100_000
    per_user: int = 50
    num_clusters: int = 64
    pool: int = 512
    affinity: float = 10.0
    popularity_exponent: float = 0.9
    seed: int = 0

    def __post_init__(self) -> None:
        if self.per_user < 5 or self.per_user > self.pool // 2:
            raise ValueError(f"per_user must be in [5, pool / 2 = {self.pool // 2}]")
        if self.interactions < self.per_user or self.num_items < self.pool:
            raise ValueError("need interactions >= per_user and num_items >= pool")

    @property
    def num_users(self) -> int:
        return max(1, self.interactions // self.per_user)


def write_stream(config: StreamSynthConfig, out: Path) -> dict[str, Path]:
    """Generates the data block by block and writes it under ``out``; returns the paths."""
    rng = np.random.default_rng(config.seed)
    n, clusters = config.num_items, config.num_clusters
    centres = _unit(rng.normal(size=(clusters, _LATENT_DIM)))
    item_cluster = rng.integers(clusters, size=n)
    item_vec = _unit(centres[item_cluster] + 0.35 * rng.normal(size=(n, _LATENT_DIM)))
    log_pop = -config.popularity_exponent * np.log(rng.permutation(n) + 1)
    by_cluster = np.argsort(item_cluster, kind="stable")
    cluster_start = np.searchsorted(item_cluster[by_cluster], np.arange(clusters + 1))
    popularity_cdf = np.cumsum(np.exp(log_pop - log_pop.max()))
    popularity_cdf /= popularity_cdf[-1]

    out = Path(out)
    (out / "train").mkdir(parents=True, exist_ok=True)
    items_config = SyntheticConfig(num_items=n, num_clusters=clusters, seed=config.seed)
    pq.write_table(_item_table(rng, items_config, item_cluster, log_pop), out / "items.parquet")

    writer = _PartWriter(out / "train")
    held_out: dict[str, list[pa.Table]] = {"valid": [], "test": []}
    users = config.num_users
    bar = tqdm(total=users * config.per_user, desc="synth", unit="row", unit_scale=True)
    for start in range(0, users, BLOCK_USERS):
        count = min(BLOCK_USERS, users - start)
        user_cluster = rng.integers(clusters, size=count)
        user_vec = _unit(centres[user_cluster] + 0.35 * rng.normal(size=(count, _LATENT_DIM)))
        half = config.pool // 2
        # half of each pool from the user's cluster, half by popularity
        size = cluster_start[user_cluster + 1] - cluster_start[user_cluster]
        own = by_cluster[
            cluster_start[user_cluster, None]
            + (rng.random((count, half)) * np.maximum(size, 1)[:, None]).astype(np.int64)
        ]
        popular = np.searchsorted(popularity_cdf, rng.random((count, half)))
        pool = np.sort(np.minimum(np.concatenate([own, popular], axis=1), n - 1), axis=1)
        logits = config.affinity * np.einsum("ud,upd->up", user_vec, item_vec[pool])
        logits += log_pop[pool]
        # a pool may hold an item twice; the copy can never be drawn
        repeated = np.c_[np.zeros(count, bool), pool[:, 1:] == pool[:, :-1]]
        noisy = np.where(repeated, -np.inf, logits + rng.gumbel(size=logits.shape))
        extra = rng.lognormal(np.log(config.per_user - 5) - 0.5, 1.0, size=count)
        per_user = np.clip(5 + np.round(extra), 5, half).astype(np.int64)
        k = int(per_user.max())
        top = np.argpartition(-noisy, k - 1, axis=1)[:, :k]
        keep = np.arange(k) < per_user[:, None]
        rows = np.broadcast_to(np.arange(count)[:, None], top.shape)[keep]
        items = np.take_along_axis(pool, top, axis=1)[keep]
        times = _START_TIME + rng.integers(0, _SPAN, size=len(rows))
        # sort each user's events by time; the last two are test and valid
        order = np.lexsort((times, rows))
        rows, items, times = rows[order], items[order], times[order]
        ends = np.searchsorted(rows, np.arange(count), side="right")
        position = np.arange(len(rows)) - np.repeat(ends - per_user, per_user)
        from_end = per_user[rows] - position  # 1: the last event
        features = user_columns(rng, user_cluster, clusters, per_user, start + 1)
        table = pa.table(
            {
                **{name: column.take(pa.array(rows)) for name, column in features.items()},
                "item_id": pa.array(items + 1),
                "timestamp": pa.array(times),
            }
        )
        writer.write(table.filter(pa.array(from_end > 2)))
        held_out["test"].append(table.filter(pa.array(from_end == 1)))
        held_out["valid"].append(table.filter(pa.array(from_end == 2)))
        bar.update(len(rows))
    bar.close()
    writer.close()
    paths = {"train": out / "train", "items": out / "items.parquet"}
    for part, tables in held_out.items():
        paths[part] = out / f"{part}.parquet"
        pq.write_table(pa.concat_tables(tables), paths[part])
    return paths


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
