"""``RedisStore``: users' states in Redis, shared by every replica of the service.

The keys of one user (``prefix`` is the store's, ``twotower`` by default; ``ID`` the
user's query key as text, so ``12`` and ``"12"`` are one user):

    PREFIX:u:{ID}:features  HASH   column -> its raw value as JSON
    PREFIX:u:{ID}:recent    LIST   "TIMESTAMP|ITEM", most recent first; TIMESTAMP is
                                   Python's ``repr`` of the float (empty when unknown),
                                   ITEM the item's key as text
    PREFIX:u:{ID}:seen      SET    the keys (as text) of every item they interacted with
    PREFIX:u:{ID}:meta      HASH   fingerprint: the artifact last loaded for them

The braces are a Redis Cluster hash tag: a user's keys share one slot, so the scripts
that change them run on one node (a cluster needs user ids that are not empty).

Reads are one pipelined round trip per batch of users. Every change of a user runs as
one Lua script, so it is atomic per user: ``append`` applies ``merge_recent``'s rule to
the stored list (timestamps compared as numbers, so both stores agree on equal ones),
and ``load_artifact`` writes an artifact's users, skipping those already tagged with its
fingerprint. Both are idempotent, so a batch sent again after a failure (or retried by
the client after a dropped connection) is taken once.

Every connection attempt and reply waits at most ``timeout`` seconds, and a command
whose connection broke is tried once more at once, so a request never hangs. The client
replaces connections the server closed and reconnects by itself when the server is
back. A server that cannot be reached raises ``StoreUnavailableError`` naming the store
and what failed.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import json
import math
import urllib.parse
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import redis
import redis.exceptions as rex
from redis.backoff import NoBackoff
from redis.retry import Retry
from tqdm.auto import tqdm

from twotower.errors import ConfigError, DataError
from twotower.serving.stores import redis_scripts
from twotower.serving.stores.base import Entry, Event, StoreUnavailableError, UserStates

if TYPE_CHECKING:
    from twotower.serving.artifact import Artifact

SCHEMES = ("redis", "rediss", "unix")
PARTS = ("features", "recent", "seen", "meta")
# Errors that say the server is gone or cannot take a command now (a replica, out of
# memory, a failed AOF write, a long script): a retry later may succeed.
_UNAVAILABLE = (rex.ConnectionError, rex.TimeoutError, rex.ReadOnlyError, rex.OutOfMemoryError)
_BUSY_REPLIES = ("MISCONF", "BUSY", "MASTERDOWN", "NOREPLICAS", "TRYAGAIN", "CLUSTERDOWN")


@dataclasses.dataclass(frozen=True)
class LoadCounts:
    """What ``load_artifact`` did.

    Attributes:
        loaded: users whose state the artifact's now holds.
        skipped: users already loaded from this artifact (same fingerprint).
    """

    loaded: int
    skipped: int


class RedisStore:
    """Users' states in Redis (``redis://``, ``rediss://`` or ``unix://`` URL).

    Args:
        url: where the server is, as redis-py reads it (a password may be in it).
        prefix: the start of every key this store writes; several stores (artifacts,
            services) can share a server under different prefixes.
        timeout: seconds a connection attempt or a reply may take before the store
            counts as unavailable.

    Raises:
        ConfigError: a URL of another scheme, or a prefix with a brace.
    """

    def __init__(self, url: str, prefix: str = "twotower", timeout: float = 1.0) -> None:
        self._name = _redacted(url)
        scheme = urllib.parse.urlsplit(url).scheme
        if scheme not in SCHEMES:
            raise ConfigError(
                f"user-state store {self._name!r}: not a Redis URL "
                "(redis://HOST:PORT/DB, rediss://... or unix:///PATH)"
            )
        if "{" in prefix or "}" in prefix:
            raise ConfigError(f"Redis key prefix {prefix!r}: braces would change the hash tag")
        self.prefix = prefix
        self._client = redis.Redis.from_url(
            url,
            decode_responses=True,
            # JSON may carry text UTF-8 cannot (a lone surrogate); as a user id it is
            # still one, kept in Redis as the bytes Python's surrogatepass gives it
            encoding_errors="surrogatepass",
            socket_timeout=timeout,
            socket_connect_timeout=timeout,
            retry=Retry(NoBackoff(), 1),
        )
        self._append = self._client.register_script(redis_scripts.APPEND)
        self._load = self._client.register_script(redis_scripts.LOAD)

    @property
    def name(self) -> str:
        """The server's URL without password or options."""
        return self._name

    def keys(self, user: Any) -> list[str]:
        """The user's four keys: features, recent, seen, meta."""
        return [f"{self.prefix}:u:{{{user}}}:{part}" for part in PARTS]

    def read(self, users: Sequence[Any]) -> UserStates:
        """The states of ``users`` (query keys, matched as text), in one round trip.

        Item ids come back as text, timestamps as floats (NaN where unknown).

        Raises:
            StoreUnavailableError: the server cannot be reached.
        """
        pipe = self._client.pipeline(transaction=False)
        for user in users:
            features, recent, seen, meta = self.keys(user)
            pipe.exists(features, recent, seen, meta)
            pipe.hgetall(features)
            pipe.lrange(recent, 0, -1)
            pipe.smembers(seen)
        with self._calling(f"reading {len(users)} users"):
            replies = pipe.execute()
        return UserStates(
            known=np.array(replies[0::4], dtype=bool),
            features=[_features(user, f) for user, f in zip(users, replies[1::4], strict=True)],
            recent=[[_parse_entry(text) for text in texts] for texts in replies[2::4]],
            seen=[sorted(items) for items in replies[3::4]],
        )

    def append(self, events: Sequence[Event], width: int) -> None:
        """Appends events to their users' recent lists (cut to ``width``) and seen sets,
        by ``merge_recent``'s rule, one script per user, every user in one pipeline.

        Raises:
            StoreUnavailableError: the server cannot be reached; some users of the
                batch may hold their events already (sending it again is harmless).
        """
        by_user: dict[str, list[str]] = collections.defaultdict(list)
        for event in events:
            by_user[str(event.user)].append(_entry_text(event.item, event.timestamp))
        calls = [(self.keys(user)[1:3], [width, *entries]) for user, entries in by_user.items()]
        with self._calling(f"appending {len(events)} events"):
            self._run(self._append, calls)

    def load_artifact(self, artifact: Artifact, chunk: int = 1000) -> LoadCounts:
        """Writes every known user of ``artifact`` (features, recent list, seen items),
        tagged with its fingerprint, ``chunk`` users per pipeline.

        Per user, atomically: a user already tagged with this fingerprint is skipped;
        else the artifact's feature values replace the stored ones, its recent entries
        are merged into a stored list by the merge rule (cut to the longest history
        the features read) or become the list where there is none, as they are, and its
        seen items join the stored ones. So loading twice is loading once, and events
        appended before the load are kept.

        Raises:
            StoreUnavailableError: the server cannot be reached (loading again resumes).
            DataError: a feature value that JSON cannot hold.
        """
        users = artifact.queries.num_rows
        items = _item_texts(artifact)
        loaded = 0
        bar = tqdm(total=users, desc="load users", unit="user", unit_scale=True, disable=None)
        with bar:
            for start in range(0, users, chunk):
                rows = np.arange(start, min(start + chunk, users))
                with self._calling(f"loading users {start} to {rows[-1]}"):
                    rows = self._not_loaded(artifact, rows)
                    calls = _load_calls(self, artifact, rows, items)
                    loaded += sum(self._run(self._load, calls))
                bar.update(min(chunk, users - start))
        return LoadCounts(loaded=loaded, skipped=users - loaded)

    def _not_loaded(self, artifact: Artifact, rows: np.ndarray) -> np.ndarray:
        """The ``rows`` whose users are not tagged with the artifact's fingerprint yet, so
        a load run again builds no scripts for them (the script checks again)."""
        users = artifact.queries.column(artifact.query_key).slice(int(rows[0]), len(rows))
        pipe = self._client.pipeline(transaction=False)
        for user in users.to_pylist():
            pipe.hget(self.keys(user)[3], "fingerprint")
        tags = np.array(pipe.execute(), dtype=object)
        return rows[tags != artifact.fingerprint]

    def ping(self) -> None:
        """Returns when the server answers.

        Raises:
            StoreUnavailableError: it does not.
        """
        with self._calling("ping"):
            self._client.ping()

    def close(self) -> None:
        """Closes the store's connections."""
        self._client.close()

    def _run(self, script: Any, calls: list[tuple[list[str], list[Any]]]) -> list[Any]:
        """Each (keys, args) call of ``script`` (EVALSHA), all in one pipeline; where the
        server lacks the script (a restarted one), it is sent and the pipeline run again,
        which the scripts' idempotence makes harmless."""
        try:
            return self._evalsha(script.sha, calls)
        except rex.NoScriptError:
            return self._evalsha(self._client.script_load(script.script), calls)

    def _evalsha(self, sha: str, calls: list[tuple[list[str], list[Any]]]) -> list[Any]:
        pipe = self._client.pipeline(transaction=False)
        for keys, args in calls:
            pipe.evalsha(sha, len(keys), *keys, *args)
        return pipe.execute()

    @contextlib.contextmanager
    def _calling(self, what: str) -> Iterator[None]:
        """Turns redis-py's errors into the store's: unavailable (the server is gone or
        cannot take the command now) or a data error (anything else)."""
        try:
            yield
        except rex.RedisError as err:
            unavailable = isinstance(err, _UNAVAILABLE) or str(err).startswith(_BUSY_REPLIES)
            kind = StoreUnavailableError if unavailable else DataError
            raise kind(f"user-state store {self.name}: {what} failed ({err})") from None


def _load_calls(
    store: RedisStore, artifact: Artifact, rows: np.ndarray, items: np.ndarray
) -> list[tuple[list[str], list[Any]]]:
    """The load script's (keys, args) for the artifact's users at ``rows``; ``items`` is
    ``_item_texts(artifact)``."""
    names = artifact.queries.schema.names  # as artifact_states: the columns it holds
    columns = [c for c in artifact.pipeline.state_columns("query") if c in names]
    table = artifact.queries.take(rows)
    users = table.column(artifact.query_key).to_pylist()
    values = table.select(columns).to_pylist()
    recent, seen = artifact.recent, artifact.seen
    width = artifact.pipeline.recent_length
    calls = []
    for user, row, features in zip(users, rows, values, strict=True):
        pairs = [text for column, value in features.items() for text in _field(column, value)]
        start, end = recent.indptr[row], recent.indptr[row + 1]
        entries = [
            _entry_text(item, t)
            for item, t in zip(items[recent.rows[start:end]], recent.times[start:end], strict=True)
        ]
        logged = items[seen.indices[seen.indptr[row] : seen.indptr[row + 1]]].tolist()
        args = [artifact.fingerprint, width, len(pairs), len(entries), *pairs, *entries, *logged]
        calls.append((store.keys(user), args))
    return calls


def _item_texts(artifact: Artifact) -> np.ndarray:
    """(N,) object array: each item row's key as text."""
    return np.array([str(item) for item in artifact.item_ids.to_pylist()], dtype=object)


def _field(column: str, value: Any) -> tuple[str, str]:
    try:
        return column, json.dumps(value)
    except TypeError:
        raise DataError(
            f"query feature column {column!r}: {value!r} has no JSON form for the store"
        ) from None


def _stamp_text(timestamp: float) -> str:
    """A timestamp's text in the store: Python's repr (exact), empty for NaN."""
    timestamp = float(timestamp)
    return "" if math.isnan(timestamp) else repr(timestamp)


def _entry_text(item: Any, timestamp: float) -> str:
    return f"{_stamp_text(timestamp)}|{item}"


def _parse_entry(text: str) -> Entry:
    stamp, _, item = text.partition("|")
    return item, float(stamp) if stamp else math.nan


def _redacted(url: str) -> str:
    """``url`` without its user, password and options: safe for logs and messages."""
    parts = urllib.parse.urlsplit(url)
    host = parts.netloc.rpartition("@")[2]
    if not parts.scheme:
        return url.rpartition("@")[2].partition("?")[0]
    return f"{parts.scheme}://{host}{parts.path}"


def _features(user: Any, stored: dict[str, str]) -> dict[str, Any]:
    """A user's stored feature values, each parsed from its JSON.

    Raises:
        DataError: a value that is not JSON (written by something else), naming it.
    """
    try:
        return {column: json.loads(value) for column, value in stored.items()}
    except ValueError as err:
        raise DataError(
            f"the stored features of user {user!r} are not JSON values ({err}); write each "
            "as JSON or load the user again (twotower state load)"
        ) from None
