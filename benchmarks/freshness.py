"""What freshness is worth: top-10 recall from each user's live state against the state
frozen at export, replayed over MovieLens-100K in time order.

    python benchmarks/freshness.py --out runs/freshness [--cut 0.8] [--epochs 8]
        [--candidates recipe,no-time] [--data-dir ../shared/datasets]
        [--results benchmarks/results] [--plot docs/freshness-ml100k.png]
        [--threads 1] [--quick]

The log is cut at one time, the ``--cut`` quantile of its timestamps. Everything
before it is what an export sees: its users are those with an event before the cut,
split leave-last-out as ``configs/ml100k.yaml`` splits; each of ``CANDIDATES`` (that
config's recipe, for at most ``--epochs`` epochs) is trained on it, the one with the
best validation NDCG@10 is exported, with every event before the cut as its users'
state. Nothing after the cut is read to train or to choose. The corpus is every movie.

Everything from the cut on is replayed in time order (equal timestamps in log order).
For each event, the top 10 items are recalled for its user by three arms, and then
the event is ingested into the live store:

    live         a ``Retriever`` whose ``MemoryStore`` took every earlier replayed event
    frozen       a second ``Retriever`` over the same artifact, whose store takes none
    frozen+seen  frozen, the user's earlier replayed items left out as live leaves them
                 out: what live gains over it is the tower reading the fresh history

Each arm leaves out the items its state has seen. A user the export does not know is
served by the frozen arms from its feature row alone (cold start), by live from its
feature row and its replayed events so far. An event is a hit (HR@10) when its item
is among the 10, and then scores NDCG@10 = 1 / log2(rank + 1) (rank from 1).
Consecutive events of distinct users are recalled in one ``retrieve`` call per
retriever and then ingested together, which answers exactly as one event at a time
does: a user's state changes only by its own events.

Writes ``freshness-ml100k.json`` and ``freshness-ml100k.md`` in ``--results`` and the
plot ``--plot``; ``--quick`` (one epoch, one candidate, the first 2,000 replayed
events) writes all three in ``--out`` instead.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from tqdm.auto import tqdm

from twotower.config import Config, apply_overrides, load_config
from twotower.data.config import DataConfig, FeatureTableConfig, InteractionsConfig
from twotower.data.dataset import ITEM_ID, QUERY_ID, TIMESTAMP, Dataset
from twotower.data.movielens import load_movielens_100k
from twotower.errors import DataError
from twotower.export import export_run
from twotower.serving import Retriever
from twotower.serving.artifact import Artifact
from twotower.serving.query import Query
from twotower.serving.stores.base import Event
from twotower.training.run import train_run

ROOT = Path(__file__).resolve().parent.parent
K = 10
# live: the store takes every replayed event; frozen: the state as exported;
# frozen+seen: as exported, the user's replayed items left out as live leaves them out
ARMS = ("live", "frozen+seen", "frozen")
METRICS = ("hr@10", "ndcg@10")
# The models trained on the export-time data; the best on its validation NDCG@10 is
# exported. Both read the user's last 70 items (configs/ml100k.yaml's recipe).
CANDIDATES = {
    "recipe": [],  # attention pooling with time-gap buckets, as the config ships
    "no-time": ["features.query.history.time_buckets=0"],  # the same without time gaps
}
# How many replayed events of the user came before an event: the breakdown's groups.
EARLIER = ((0, 0), (1, 4), (5, 19), (20, 99), (100, None))


@dataclasses.dataclass(frozen=True)
class Events:
    """Interactions in the order they are replayed: (E,) users, items, timestamps."""

    users: np.ndarray
    items: np.ndarray
    timestamps: np.ndarray

    def __len__(self) -> int:
        return len(self.users)

    def slice(self, start: int, end: int) -> Events:
        """Events ``start`` to ``end``."""
        at = slice(start, end)
        return Events(self.users[at], self.items[at], self.timestamps[at])


@dataclasses.dataclass(frozen=True)
class Cut:
    """A log cut at one time: what the export sees, and what is replayed after it.

    Attributes:
        before: the interactions before the cut (query_id, item_id, timestamp).
        replay: those from the cut on, in time order.
        dataset: the whole dataset (its feature tables give every user's row).
        time: the cut, in the log's units.
    """

    before: pa.Table
    replay: Events
    dataset: Dataset
    time: float

    def known_queries(self) -> pa.Table:
        """The feature rows of the users with an event before the cut."""
        queries = self.dataset.queries
        users = pc.unique(self.before.column(QUERY_ID))
        return queries.filter(pc.is_in(queries.column(self.dataset.query_key), value_set=users))


def cut_log(dataset: Dataset, quantile: float) -> Cut:
    """Cuts ``dataset``'s log at the ``quantile`` of its timestamps: events earlier than
    that time go to the export, the others are replayed."""
    stamps = dataset.column(TIMESTAMP)
    at = float(np.quantile(stamps, quantile))
    early = stamps < at
    later = np.flatnonzero(~early)
    order = later[np.argsort(stamps[later], kind="stable")]
    replay = Events(
        dataset.column(QUERY_ID)[order],
        dataset.column(ITEM_ID)[order],
        stamps[order].astype(np.float64),
    )
    before = dataset.interactions.select([QUERY_ID, ITEM_ID, TIMESTAMP]).filter(pa.array(early))
    return Cut(before, replay, dataset, at)


def export_data(cut: Cut, folder: Path) -> DataConfig:
    """Writes what the export sees as Parquet in ``folder``; returns the data config
    that reads it (the known users' rows, every item)."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = {name: folder / f"{name}.parquet" for name in ("interactions", "queries", "items")}
    pq.write_table(cut.before, paths["interactions"])
    pq.write_table(cut.known_queries(), paths["queries"])
    pq.write_table(cut.dataset.items, paths["items"])
    return DataConfig(
        source="files",
        interactions=InteractionsConfig(
            paths["interactions"], query_id=QUERY_ID, item_id=ITEM_ID, timestamp=TIMESTAMP
        ),
        queries=FeatureTableConfig(paths["queries"], key=cut.dataset.query_key),
        items=FeatureTableConfig(paths["items"], key=cut.dataset.item_key),
    )


def export_chosen(config: Config, candidates: Mapping[str, list[str]], out: Path) -> dict:
    """Trains each candidate (``config`` with its overrides) in ``out/<name>`` and exports
    the one with the best ``config.training.metric`` (a validation metric) as
    ``out/artifact``; returns the choice and each candidate's validation metrics."""
    metric = config.training.metric
    runs = {}
    for name, overrides in candidates.items():
        metrics = train_run(apply_overrides(config, overrides), out / name).metrics
        runs[name] = {
            k: v for k, v in metrics.items() if k.startswith("valid/") and k.endswith("@10")
        }
        runs[name]["best_epoch"] = metrics["best_epoch"]
    chosen = max(runs, key=lambda name: runs[name][metric])
    export_run(out / chosen, out / "artifact")
    return {"chosen": chosen, "metric": metric, "candidates": runs}


@dataclasses.dataclass(frozen=True)
class Replayed:
    """Each replayed event's outcome, (E,) arrays in replay order.

    Attributes:
        users: the event's user.
        known: whether the export knew the user.
        earlier: how many replayed events of the user came before this one.
        ranks: per arm (``ARMS``), the event item's rank in the top k (0 is the
            best), -1 when it is not there.
    """

    users: np.ndarray
    known: np.ndarray
    earlier: np.ndarray
    ranks: dict[str, np.ndarray]

    def hits(self, arm: str) -> np.ndarray:
        """(E,) 1.0 where the arm's top k held the event's item."""
        return (self.ranks[arm] >= 0).astype(np.float64)

    def ndcg(self, arm: str) -> np.ndarray:
        """(E,) NDCG@k of one relevant item: 1 / log2(rank + 1), ranks from 1."""
        ranks = self.ranks[arm]
        return np.where(ranks >= 0, 1.0 / np.log2(np.maximum(ranks, 0) + 2.0), 0.0)


class Replayer:
    """The three arms (``ARMS``) over one artifact, and what the live arm took so far.

    Args:
        live: the retriever whose store takes the events.
        frozen: a retriever over the same artifact whose store takes none.
        rows: the raw feature row of each user the artifact does not know.
        k: how many items each recall returns.

    Raises:
        ValueError: both retrievers share one store.
    """

    def __init__(
        self, live: Retriever, frozen: Retriever, rows: Mapping[Any, dict], k: int = K
    ) -> None:
        if live.store is frozen.store:
            raise ValueError("the live and frozen retrievers need stores of their own")
        self.live, self.frozen, self.rows, self.k = live, frozen, rows, k
        self.since: dict[Any, list[Any]] = {}  # each user's ingested items

    def recall(self, events: Events) -> dict[str, list[int]]:
        """Each arm's rank of each event's item in its user's top k (-1: not there), for
        events of distinct users, in one ``retrieve`` call per retriever.

        Raises:
            DataError: a recall failed (the first failure's).
        """
        users, items = events.users.tolist(), events.items.tolist()
        asked = self._queries(users, (self.live.artifact.query_rows(users) >= 0).tolist())
        answers = self.frozen.retrieve(asked["frozen"] + asked["frozen+seen"])  # one search
        return {
            "live": _ranks(self.live.retrieve(asked["live"]), items),
            "frozen": _ranks(answers[: len(users)], items),
            "frozen+seen": _ranks(answers[len(users) :], items),
        }

    def ingest(self, events: Events) -> None:
        """Appends the events to the live store (the frozen store never takes any)."""
        users, items = events.users.tolist(), events.items.tolist()
        triples = zip(users, items, events.timestamps.tolist(), strict=True)
        refused = self.live.ingest([Event(*t) for t in triples])
        assert not refused, refused  # every replayed item is in the corpus
        for user, item in zip(users, items, strict=True):
            self.since.setdefault(user, []).append(item)

    def _queries(self, users: list[Any], known: list[bool]) -> dict[str, list[Query]]:
        """Each arm's queries: a known user by its id, a new one by its feature row (for
        live, with the id naming its state in the store); ``frozen+seen`` leaves out
        the items the user has had since the export."""
        asked: dict[str, list[Query]] = {arm: [] for arm in ARMS}
        for user, was in zip(users, known, strict=True):
            frozen = {"user": user} if was else {"features": self.rows[user]}
            live = {"user": user} if was else {"user": user, "features": self.rows[user]}
            since = tuple(self.since.get(user, ()))
            asked["live"].append(Query(**live, k=self.k))
            asked["frozen"].append(Query(**frozen, k=self.k))
            asked["frozen+seen"].append(Query(**frozen, k=self.k, exclude_items=since))
        return asked


def replay(replayer: Replayer, events: Events) -> Replayed:
    """Recalls each event by every arm, then ingests it, in order; each run of
    consecutive events of distinct users at once (``distinct_runs``)."""
    ranks = {arm: np.full(len(events), -1, np.int64) for arm in ARMS}
    with tqdm(total=len(events), desc="replay", unit="event", disable=None) as bar:
        for start, end in distinct_runs(events.users):
            part = events.slice(start, end)
            for arm, found in replayer.recall(part).items():
                ranks[arm][start:end] = found
            replayer.ingest(part)
            bar.update(end - start)
    known = replayer.live.artifact.query_rows(events.users.tolist()) >= 0
    return Replayed(events.users, known, earlier_events(events.users), ranks)


def _ranks(answers: Sequence[Any], items: Sequence[Any]) -> list[int]:
    """Each item's place in its answer's items, -1 where absent."""
    ranks = []
    for answer, item in zip(answers, items, strict=True):
        if isinstance(answer, DataError):
            raise answer
        ranks.append(answer.items.index(item) if item in answer.items else -1)
    return ranks


def distinct_runs(users: np.ndarray) -> list[tuple[int, int]]:
    """(start, end) of the longest runs of consecutive events with distinct users, in
    order: a run ends where its next event's user already has an event in it."""
    runs, start, taken = [], 0, set()
    for position, user in enumerate(users.tolist()):
        if user in taken:
            runs.append((start, position))
            start, taken = position, set()
        taken.add(user)
    if len(users):
        runs.append((start, len(users)))
    return runs


def earlier_events(users: np.ndarray) -> np.ndarray:
    """(E,) how many events of the same user come before each event."""
    order = np.argsort(users, kind="stable")
    grouped = users[order]
    starts = np.flatnonzero(np.r_[True, grouped[1:] != grouped[:-1]])
    counts = np.diff(np.r_[starts, len(users)])
    earlier = np.empty(len(users), np.int64)
    earlier[order] = np.arange(len(users)) - np.repeat(starts, counts)
    return earlier


def summary(replayed: Replayed, draws: int = 2000) -> dict:
    """HR@10 and NDCG@10 of each arm: overall, for known and new users, and by how many
    replayed events the user had before; with the overall gaps of ``live`` over each
    frozen arm, each with a 95% interval from resampling users (a user's events are
    not independent of each other)."""
    groups = {"all": np.ones(len(replayed.users), bool), "known": replayed.known}
    groups["new"] = ~replayed.known
    result: dict = {"overall": {}, "gaps": {}, "by_earlier": {}}
    for name, mask in groups.items():
        result["overall"][name] = _scores(replayed, mask)
        result["gaps"][name] = {
            f"live - {arm} {metric}": _gap(replayed, arm, metric, mask, draws)
            for metric in METRICS
            for arm in ARMS[1:]
        }
    for name in ("known", "new"):
        result["by_earlier"][name] = {
            _label(low, high): _scores(replayed, groups[name] & _within(replayed, low, high))
            for low, high in EARLIER
        }
    return result


def _scores(replayed: Replayed, mask: np.ndarray) -> dict:
    scores: dict = {"events": int(mask.sum()), "users": len(np.unique(replayed.users[mask]))}
    for arm in ARMS:
        values = {"hr@10": replayed.hits(arm), "ndcg@10": replayed.ndcg(arm)}
        scores[arm] = {m: float(v[mask].mean()) if mask.any() else None for m, v in values.items()}
    return scores


def _gap(replayed: Replayed, arm: str, metric: str, mask: np.ndarray, draws: int) -> dict:
    """The mean of live's metric minus ``arm``'s over the events of ``mask``, and the
    2.5% and 97.5% quantiles of that mean over users drawn with replacement."""
    values = replayed.hits if metric == "hr@10" else replayed.ndcg
    gaps = (values("live") - values(arm))[mask]
    if not len(gaps):
        return {"mean": None, "95%": [None, None]}
    _, owner = np.unique(replayed.users[mask], return_inverse=True)
    sums, counts = np.bincount(owner, gaps), np.bincount(owner)
    picks = np.random.default_rng(0).integers(0, len(sums), size=(draws, len(sums)))
    means = sums[picks].sum(axis=1) / counts[picks].sum(axis=1)
    return {"mean": float(gaps.mean()), "95%": np.quantile(means, [0.025, 0.975]).tolist()}


def _within(replayed: Replayed, low: int, high: int | None) -> np.ndarray:
    return (replayed.earlier >= low) & (high is None or replayed.earlier <= high)


def _label(low: int, high: int | None) -> str:
    return f"{low}+" if high is None else str(low) if low == high else f"{low}-{high}"


GROUPS = {"all": "all users", "known": "known at export", "new": "new since export"}


def markdown(result: dict) -> str:
    """The tables of a ``summary``: each arm overall, the gaps, then by earlier events."""
    arms = " | ".join(f"{metric.upper()} {arm}" for metric in METRICS for arm in ARMS)
    header = f"| {{}} | events | users | {arms} |\n|---|" + "---:|" * (2 + 2 * len(ARMS))
    lines = [header.format("users")]
    overall = result["overall"].items()
    lines += [_row(GROUPS[name], scores) for name, scores in overall if scores["events"]]
    gaps = [f"live - {arm} {metric}" for metric in METRICS for arm in ARMS[1:]]
    lines += ["", f"| users | {' | '.join(gaps)} (95% interval) |", "|---|" + "---:|" * len(gaps)]
    for name, values in result["gaps"].items():
        if result["overall"][name]["events"]:
            cells = " | ".join(_gap_cell(values[gap]) for gap in gaps)
            lines.append(f"| {GROUPS[name]} | {cells} |")
    lines += ["", header.format("users, earlier replayed events of the user")]
    for name, buckets in result["by_earlier"].items():
        for label, scores in buckets.items():
            if scores["events"]:
                lines.append(_row(f"{GROUPS[name]}, {label}", scores))
    return "\n".join(lines) + "\n"


def _gap_cell(gap: dict) -> str:
    low, high = gap["95%"]
    return f"{gap['mean']:+.4f} [{low:+.4f}, {high:+.4f}]"


def _row(name: str, scores: dict) -> str:
    cells = " | ".join(f"{scores[arm][metric]:.4f}" for metric in METRICS for arm in ARMS)
    return f"| {name} | {scores['events']:,} | {scores['users']:,} | {cells} |"


def plot(result: dict, path: Path) -> None:
    """Each arm's HR@10 and NDCG@10 by earlier replayed events, known and new users."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(2, 2, figsize=(11, 6.5), sharex="col")
    for column, (name, buckets) in enumerate(result["by_earlier"].items()):
        labels = [label for label, scores in buckets.items() if scores["events"]]
        x = np.arange(len(labels))
        for row, metric in enumerate(METRICS):
            axis = axes[row, column]
            for offset, arm in zip((-0.27, 0, 0.27), ARMS, strict=True):
                values = [buckets[label][arm][metric] for label in labels]
                axis.bar(x + offset, values, width=0.27, label=arm)
            axis.set_ylabel(metric.upper())
            axis.set_xticks(x, [f"{b}\nn={buckets[b]['events']:,}" for b in labels])
            axis.grid(axis="y", alpha=0.3)
        axes[0, column].set_title(f"users {GROUPS[name]}")
        axes[1, column].set_xlabel("earlier replayed events of the user (n: events)")
    axes[0, 0].legend()
    figure.suptitle("Top-10 recall of each replayed event: live state against frozen")
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    plt.close(figure)


def new_user_rows(cut: Cut, columns: Sequence[str]) -> dict[Any, dict[str, Any]]:
    """The raw feature rows (``columns``) of the replayed users the export does not know."""
    queries = cut.dataset.queries
    known = set(pc.unique(cut.before.column(QUERY_ID)).to_pylist())
    keys = queries.column(cut.dataset.query_key).to_pylist()
    rows = queries.select(list(columns)).to_pylist()
    replayed = set(cut.replay.users.tolist())
    return {
        key: row
        for key, row in zip(keys, rows, strict=True)
        if key in replayed and key not in known
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("runs/freshness"))
    parser.add_argument("--cut", type=float, default=0.8, help="quantile of the timestamps")
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--candidates", default=",".join(CANDIDATES))
    parser.add_argument("--data-dir", type=Path, default=ROOT.parent / "shared" / "datasets")
    parser.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--plot", type=Path, default=ROOT / "docs" / "freshness-ml100k.png")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="1 epoch, 1 model, 2,000 events")
    args = parser.parse_args()
    folder = args.data_dir / "ml-100k"
    if not (folder / "u.data").is_file():
        print(f"MovieLens-100K is not in {folder}: nothing to replay, skipped")
        return
    if args.quick:
        args.epochs, args.candidates = 1, args.candidates.split(",")[0]
        args.results, args.plot = args.out, args.out / "freshness-ml100k.png"
    result = run(args, folder)
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / "freshness-ml100k.json").write_text(json.dumps(result, indent=2) + "\n")
    table = markdown(result["summary"])
    (args.results / "freshness-ml100k.md").write_text(table)
    plot(result["summary"], args.plot)
    print(table)


def run(args: argparse.Namespace, folder: Path) -> dict:
    """Cuts, trains, exports and replays, as the module doc says; returns the record."""
    seconds = {}
    clock = time.perf_counter()
    cut = cut_log(load_movielens_100k(folder), args.cut)
    events = cut.replay.slice(0, 2000) if args.quick else cut.replay
    overrides = [f"training.epochs={args.epochs}", f"threads={args.threads}"]
    config = load_config(
        ROOT / "configs" / "ml100k.yaml", [*overrides, "training.tensorboard=false"]
    )
    config = dataclasses.replace(config, data=export_data(cut, args.out / "data"))
    wanted = {name: CANDIDATES[name] for name in args.candidates.split(",")}
    chosen = export_chosen(config, wanted, args.out)
    seconds["train and export"] = time.perf_counter() - clock
    artifact = Artifact.load(args.out / "artifact")
    live, frozen = Retriever(artifact), Retriever(artifact)
    rows = new_user_rows(cut, live.query_columns)
    clock = time.perf_counter()
    replayed = replay(Replayer(live, frozen, rows), events)
    seconds["replay"] = time.perf_counter() - clock
    return {
        "cut": {
            "quantile": args.cut,
            "time": datetime.datetime.fromtimestamp(cut.time, datetime.UTC).isoformat(),
            "events before": cut.before.num_rows,
            "users before": cut.known_queries().num_rows,
            "events replayed": len(events),
            "users replayed": len(np.unique(events.users)),
            "of them new since export": len(rows),
            "retrieve calls per retriever": len(distinct_runs(events.users)),
        },
        "model": {**chosen, "epochs at most": args.epochs},
        "seconds": {name: round(value, 1) for name, value in seconds.items()},
        "summary": summary(replayed),
    }


if __name__ == "__main__":
    main()
