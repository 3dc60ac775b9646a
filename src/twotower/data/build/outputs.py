"""The plan's last steps: each query's state per step, the training rows' histories,
and the parts, the corpus and the query rows written out.

A training row's history holds its query's item ids, most recent first, made
leak-free as in memory (``before_event``: a window over the rows before it;
``mask_target``: the query's latest training items, the target's entries null). A
held-out row, and a query's row in ``queries_{step}.parquet``, holds its query's
latest items as of its step. Between equal timestamps (or without any), a training
row is older than a validation row, as in memory, where the parts known by then are
concatenated in order.
"""

from __future__ import annotations

from collections.abc import Callable

from twotower.data.build.format import POSITION, STEPS, TRAIN_INTERACTIONS, OutputColumns
from twotower.data.build.inputs import PART
from twotower.data.build.job import BuildJob, Database
from twotower.data.build.parquet import Files
from twotower.data.dataset import ITEM_ID, QUERY_ID, TIMESTAMP
from twotower.data.splits import SPLIT_NAMES
from twotower.errors import DataError

Quote = Callable[[str], str]  # a dialect's identifier quoting


def write_parts(db: Database, job: BuildJob, rule: str) -> Files:
    """Tables ``latest_{step}`` (``_step_table``), then each part as Parquet in source
    order, the training rows with their histories; returns each file's rows and sha256.

    Raises:
        DataError: a part has no rows.
    """
    q = db.dialect.quote
    lengths = job.histories.lengths
    has_time = TIMESTAMP in db.columns("interactions")
    recency = [f"i.{q(TIMESTAMP)}", f"i.{POSITION}"] if has_time else [f"i.{POSITION}"]
    longest = max(lengths.values(), default=0)
    if rule == "mask_target" and longest:
        _latest_train(db, longest, recency)
    # the order of what was known by a step: a training row before a validation row
    known = [*recency[:-1], f"i.{PART}", f"i.{POSITION}"]
    for target, name in enumerate(STEPS, start=1):
        _step_table(db, name, target, longest, known)
    files: Files = {}
    for index, name in enumerate(SPLIT_NAMES):
        columns, join = _history_columns(db, name, lengths, rule, recency)
        select = ", ".join(_row_columns(job.outputs, q) + columns)
        query = (
            f"SELECT {select} FROM interactions i {join} "
            f"LEFT JOIN query_table q ON i.{q(QUERY_ID)} = q.key WHERE i.{PART} = {index}"
        )
        per_file = job.options.rows_per_part if name == "train" else None
        written = db.write(query, POSITION, name, per_file)
        if not written:
            raise DataError(f"the {name} split has no interactions after splitting")
        files.update(written)
    return files


def _history_columns(
    db: Database, part: str, lengths: dict[str, int], rule: str, recency: list[str]
) -> tuple[list[str], str]:
    """A part's rows' history columns and the join they read: a training row's history
    by ``rule``; a held-out row's, its query's as of its step."""
    if not lengths:
        return [], ""
    d, q = db.dialect, db.dialect.quote
    query, item = f"i.{q(QUERY_ID)}", f"i.{q(ITEM_ID)}"
    if part != "train":
        join = f"LEFT JOIN latest_{part} l ON {query} = l.{q(QUERY_ID)}"
        return [f"{d.head(d.or_empty('l.items'), n)} AS {q(c)}" for c, n in lengths.items()], join
    if rule == "mask_target":  # the query's latest items, the target's own entries null
        join = f"LEFT JOIN latest_train l ON {query} = l.{q(QUERY_ID)}"
        columns = [
            f"{d.blank(d.head(d.or_empty('l.items'), n), item)} AS {q(c)}"
            for c, n in lengths.items()
        ]
        return columns, join
    columns = []
    for column, length in lengths.items():  # before_event: the query's rows before it
        window = (
            f"PARTITION BY {query} ORDER BY {', '.join(recency)} "
            f"ROWS BETWEEN {length} PRECEDING AND 1 PRECEDING"
        )
        earlier = d.or_empty(d.window_list(item, window))
        columns.append(f"{d.reverse(earlier)} AS {q(column)}")
    return columns, ""


def _latest_train(db: Database, length: int, recency: list[str]) -> None:
    """Table ``latest_train``: each query's latest ``length`` training items, most
    recent first (``items``)."""
    d, query = db.dialect, f"i.{db.dialect.quote(QUERY_ID)}"
    items = d.head(d.or_empty(d.latest(f"i.{d.quote(ITEM_ID)}", recency, None)), length)
    db.create(
        "latest_train",
        f"SELECT {query}, {items} AS items FROM interactions i WHERE i.{PART} = 0 GROUP BY {query}",
    )


def _step_table(db: Database, name: str, target: int, length: int, known: list[str]) -> None:
    """Table ``latest_{name}``: every query with interactions up to part ``target``
    (1: valid, 2: test, 3: all, which has no part of its own), with what was known
    before that part (its latest ``length`` items, most recent first, as ``items``; its
    distinct items, ``seen``), the part's own distinct items (``targets``) and its
    training rows (``train_interactions``)."""
    d, query = db.dialect, f"i.{db.dialect.quote(QUERY_ID)}"
    item, before = f"i.{d.quote(ITEM_ID)}", f"i.{PART} < {target}"
    items = f"{d.head(d.or_empty(d.latest(item, known, before)), length)} AS items, "
    db.create(
        f"latest_{name}",
        f"SELECT {query}, {items if length else ''}"
        f"{d.distinct_sorted(item, before)} AS seen, "
        f"{d.distinct_sorted(item, f'i.{PART} = {target}')} AS targets, "
        f"CAST(count(CASE WHEN i.{PART} = 0 THEN 1 END) AS BIGINT) AS {TRAIN_INTERACTIONS} "
        f"FROM interactions i WHERE i.{PART} <= {target} GROUP BY {query}",
    )


def write_items(db: Database, job: BuildJob) -> Files:
    """``items.parquet``: the corpus in the item table's order, keyed by the
    interactions' item id column, with the item features' columns."""
    q, outputs = db.dialect.quote, job.outputs
    parts = [f"key AS {q(outputs.roles[ITEM_ID])}"]
    parts += [
        f"key AS {q(n)}" if source == "key" else f"{q(source)} AS {q(n)}"
        for n, source in outputs.item.items()
    ]
    query = f"SELECT {', '.join(parts)} FROM item_table"
    return db.write(query, db.source_order("item_table"), "items", None)


def write_queries(db: Database, job: BuildJob) -> Files:
    """``queries_{step}.parquet``: every query with interactions up to that step, by
    id: its features, histories and ``QUERY_COLUMNS``, from ``_step_table``'s tables."""
    d, q = db.dialect, db.dialect.quote
    files: Files = {}
    for name in STEPS:
        columns = [f"{d.head('s.items', n)} AS {q(c)}" for c, n in job.histories.lengths.items()]
        select = _query_row(job.outputs, q) + columns
        select += ["s.seen", "s.targets", f"s.{TRAIN_INTERACTIONS}"]
        query = (
            f"SELECT {', '.join(select)} FROM latest_{name} s "
            f"LEFT JOIN query_table q ON s.{q(QUERY_ID)} = q.key"
        )
        files.update(db.write(query, f"s.{q(QUERY_ID)}", f"queries_{name}", None))
    return files


def _row_columns(outputs: OutputColumns, q: Quote) -> list[str]:
    """The SELECT list of an output row of interactions ``i``: the roles renamed,
    ``position``, and the query features (from ``q``, the query table joined)."""
    roles = [f"i.{q(c)} AS {q(n)}" for c, n in outputs.roles.items()]
    return [*roles, f"i.{POSITION}", *_query_features(outputs, q, "i")]


def _query_row(outputs: OutputColumns, q: Quote) -> list[str]:
    """The SELECT list of a query's row of ``s`` (a ``latest_*`` table): its id and its
    features (``q`` joined)."""
    first = f"s.{q(QUERY_ID)} AS {q(outputs.roles[QUERY_ID])}"
    return [first, *_query_features(outputs, q, "s")]


def _query_features(outputs: OutputColumns, q: Quote, table: str) -> list[str]:
    return [
        f"{table}.{q(QUERY_ID)} AS {q(n)}" if source == "key" else f"q.{q(source)} AS {q(n)}"
        for n, source in outputs.query.items()
    ]
