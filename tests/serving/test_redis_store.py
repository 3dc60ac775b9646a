"""RedisStore against a real redis-server: the merge rule equals merge_recent, its answers
equal the in-memory store's, loads are idempotent, and a lost or killed server loses no
acknowledged event."""

from __future__ import annotations

import itertools
import math
import signal
import threading
import time
import types

import numpy as np
import pyarrow as pa
import pytest
import redis
import redis.connection
import scipy.sparse as sp
from hypothesis import given, settings
from hypothesis import strategies as st
from redis.crc import key_slot
from typer.testing import CliRunner

from twotower.cli import app, main
from twotower.errors import ConfigError, DataError
from twotower.features.history import RecentLists
from twotower.serving.artifact import Artifact
from twotower.serving.stores.base import Event, StoreUnavailableError, merge_recent
from twotower.serving.stores.memory import MemoryStore, artifact_states
from twotower.serving.stores.redis_store import LoadCounts, RedisStore

NAN = math.nan
_users = itertools.count()


def normal(entries) -> list:
    """Entries comparable with ==: NaN as None, items as text."""
    return [(str(item), None if math.isnan(t) else t) for item, t in entries]


def fake_artifact(fingerprint: str = "f1", ages=(31.0, None, 45.5)):
    """What load_artifact reads of an artifact: three users of four items (keys 10..13);
    user 7 clicked item 11 twice without a timestamp, user 8 nothing."""
    queries = pa.table(
        {"user_id": [5, 7, 8], "segment": ["a", "b", None], "age": list(ages), "extra": [1, 2, 3]}
    )
    recent = RecentLists(
        indptr=np.array([0, 3, 5, 5]),
        rows=np.array([2, 0, 1, 1, 1]),
        times=np.array([30.0, 20.0, 20.0, NAN, NAN]),
    )
    seen = sp.csr_matrix((np.ones(4), ([0, 0, 0, 1], [0, 1, 2, 1])), shape=(3, 4))
    return types.SimpleNamespace(
        fingerprint=fingerprint,
        queries=queries,
        query_key="user_id",
        item_ids=pa.array([10, 11, 12, 13]),
        recent=recent,
        seen=seen,
        pipeline=types.SimpleNamespace(
            state_columns=lambda side: ["segment", "age"], recent_length=4
        ),
    )


@pytest.fixture
def store(shared_redis):
    """A store over the module's server, under a prefix of this test's own."""
    store = RedisStore(shared_redis.url, prefix=f"t{next(_users)}")
    yield store
    store.close()


entries = st.tuples(
    st.sampled_from(["a", "b", "c", "12", "x|y"]),
    st.one_of(
        st.sampled_from([NAN, 0.0, -0.0, 1.0, 2.0, 0.1 + 0.2, 1e16]),
        st.floats(-1e6, 1e6, allow_nan=False),
    ),
)


@settings(max_examples=150, deadline=None)
@given(batches=st.lists(st.tuples(st.integers(0, 6), st.lists(entries, max_size=8)), max_size=6))
def test_lua_merge_equals_merge_recent(shared_redis, batches):
    store = RedisStore(shared_redis.url, prefix="merge")
    user = f"u{next(_users)}"
    expected, seen = [], set()
    for width, events in batches:
        store.append([Event(user, item, t) for item, t in events], width)
        if events:  # a batch without the user's events leaves its list as it is
            expected = merge_recent(expected, events, width)
        seen |= {item for item, _ in events}
    states = store.read([user])
    assert normal(states.recent[0]) == normal(expected)
    assert set(states.seen[0]) == seen
    assert states.known[0] == bool(seen)
    store.close()


def test_read_after_append_gives_texts_and_floats(store):
    store.append([Event(17, 10, 1.5), Event(17, "x", NAN), Event(3, 12, 2.0)], width=5)
    states = store.read([17, "17", 99])
    assert states.known.tolist() == [True, True, False]
    assert states.recent[0] == states.recent[1]
    assert normal(states.recent[0]) == [("x", None), ("10", 1.5)]
    assert isinstance(states.recent[0][1][1], float)
    assert states.seen[0] == ["10", "x"]
    assert (states.features[2], states.recent[2], states.seen[2]) == ({}, [], [])


def test_keys_follow_the_documented_layout(store, shared_redis):
    store.append([Event(17, 10, 1.5), Event(17, 11, NAN)], width=5)
    raw = redis.Redis.from_url(shared_redis.url, decode_responses=True)
    assert raw.lrange(f"{store.prefix}:u:{{17}}:recent", 0, -1) == ["|11", "1.5|10"]
    assert raw.smembers(f"{store.prefix}:u:{{17}}:seen") == {"10", "11"}
    assert len({key_slot(key.encode()) for key in store.keys(17)}) == 1  # one cluster slot
    raw.close()


def test_concurrent_appends_lose_nothing(store):
    users, threads, per_thread = ["a", "b", "c"], 8, 25

    def send(thread: int) -> None:
        for n in range(per_thread):
            t = float(thread * per_thread + n)
            store.append([Event(user, f"{user}{t}", t) for user in users], width=1000)

    workers = [threading.Thread(target=send, args=(i,)) for i in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    states = store.read(users)
    total = threads * per_thread
    for user, recent, seen in zip(users, states.recent, states.seen, strict=True):
        stamps = [float(t) for t in range(total)][::-1]
        assert normal(recent) == [(f"{user}{t}", t) for t in stamps]
        assert len(seen) == total


def test_load_equals_the_artifact(store):
    counts = store.load_artifact(fake_artifact(), chunk=2)
    assert counts == LoadCounts(loaded=3, skipped=0)
    states = store.read([5, 7, 8])
    assert states.known.tolist() == [True, True, True]
    assert states.features == [
        {"segment": "a", "age": 31.0},
        {"segment": "b", "age": None},
        {"segment": None, "age": 45.5},
    ]
    assert normal(states.recent[0]) == [("12", 30.0), ("10", 20.0), ("11", 20.0)]
    assert normal(states.recent[1]) == [("11", None), ("11", None)]  # as the artifact has it
    assert states.recent[2] == []
    assert states.seen == [["10", "11", "12"], ["11"], []]


def test_load_twice_is_once(store):
    artifact = fake_artifact()
    store.load_artifact(artifact)
    first = store.read([5, 7, 8])
    assert store.load_artifact(artifact, chunk=1) == LoadCounts(loaded=0, skipped=3)
    again = store.read([5, 7, 8])
    assert (again.features, again.recent, again.seen) == (first.features, first.recent, first.seen)


def test_load_keeps_events_appended_before_it(store):
    before = [Event(5, 13, 25.0), Event(5, 10, 20.0), Event(42, 13, 1.0)]
    store.append(before, width=4)
    store.load_artifact(fake_artifact())
    states = store.read([5, 42])
    stored = merge_recent([], [("13", 25.0), ("10", 20.0)], 4)
    artifact_list = [("12", 30.0), ("10", 20.0), ("11", 20.0)]
    assert normal(states.recent[0]) == normal(merge_recent(stored, artifact_list[::-1], 4))
    assert normal(states.recent[0]) == [("12", 30.0), ("13", 25.0), ("11", 20.0), ("10", 20.0)]
    assert states.seen[0] == ["10", "11", "12", "13"]
    assert states.features[0] == {"segment": "a", "age": 31.0}
    assert normal(states.recent[1]) == [("13", 1.0)]  # a user the artifact lacks: untouched


def test_a_new_artifact_replaces_features_and_merges_the_rest(store):
    store.load_artifact(fake_artifact())
    store.append([Event(7, 12, 50.0)], width=4)
    counts = store.load_artifact(fake_artifact("f2", ages=(32.0, 60.0, None)))
    assert counts == LoadCounts(loaded=3, skipped=0)
    states = store.read([5, 7])
    assert [f["age"] for f in states.features] == [32.0, 60.0]
    # merged: the artifact's entries are in the list already, so only the event is new
    assert normal(states.recent[1]) == [("12", 50.0), ("11", None), ("11", None)]


def test_a_value_json_cannot_hold_is_refused_by_column(store):
    artifact = fake_artifact()
    artifact.queries = artifact.queries.set_column(
        1, "segment", pa.array([b"\x00", b"b", b"c"], pa.binary())
    )
    with pytest.raises(DataError, match="'segment'"):
        store.load_artifact(artifact)


def test_urls_and_prefixes_are_checked_and_passwords_kept_out():
    store = RedisStore("redis://user:secret@127.0.0.1:1/0?password=secret2")
    assert store.name == "redis://127.0.0.1:1/0"
    store.close()
    assert RedisStore("unix:///run/redis.sock?db=1").name == "unix:///run/redis.sock"
    with pytest.raises(ConfigError, match="http://host:1") as refused:
        RedisStore("http://user:secret@host:1")
    assert "secret" not in str(refused.value)
    with pytest.raises(ConfigError, match="hash tag"):
        RedisStore("redis://127.0.0.1:1", prefix="a{b}")


def _unavailable(call, store: RedisStore, limit: float) -> StoreUnavailableError:
    """The error ``call`` raises; it must come within ``limit`` seconds (no hang)."""
    began = time.monotonic()
    with pytest.raises(StoreUnavailableError) as raised:
        call()
    # a guard against hanging, not a measurement: the bound is many timeouts long
    assert time.monotonic() - began < limit
    assert store.name in str(raised.value)
    return raised.value


def test_a_stopped_server_is_unavailable_and_the_store_recovers(redis_server):
    store = RedisStore(redis_server.url, timeout=0.5)
    store.append([Event(1, 10, 1.0)], width=5)
    redis_server.stop()
    error = _unavailable(lambda: store.read([1]), store, limit=10)
    assert "reading 1 users" in str(error)
    error = _unavailable(lambda: store.append([Event(1, 11, 2.0)], 5), store, limit=10)
    assert "appending 1 events" in str(error)
    _unavailable(store.ping, store, limit=10)
    redis_server.start()  # same port and folder; the same store object reconnects
    store.ping()
    store.append([Event(1, 11, 2.0)], width=5)  # the restarted server has no scripts yet
    assert normal(store.read([1]).recent[0]) == [("11", 2.0), ("10", 1.0)]
    store.close()


def test_a_frozen_server_times_out_and_the_store_recovers(redis_server):
    store = RedisStore(redis_server.url, timeout=0.3)
    store.ping()
    redis_server.pause()
    try:
        _unavailable(lambda: store.read([1]), store, limit=10)
    finally:
        redis_server.resume()
    store.append([Event(1, 10, 1.0)], width=5)
    assert store.read([1]).known.tolist() == [True]
    store.close()


def test_sigkill_right_after_append_loses_no_acknowledged_event(redis_server):
    store = RedisStore(redis_server.url)
    events = [Event(user, item, float(item)) for user in range(20) for item in range(5)]
    store.append(events, width=10)
    redis_server.stop(signal.SIGKILL)
    redis_server.start()  # reads the append-only file of the same folder
    states = store.read(list(range(20)))
    assert states.known.all()
    for recent in states.recent:
        assert normal(recent) == [(str(i), float(i)) for i in reversed(range(5))]
    store.close()


def test_a_batch_is_one_round_trip(store, monkeypatch):
    store.append([Event(0, 1, 1.0)], width=5)  # the server has the script from now on
    sent = []
    send = redis.connection.Connection.send_packed_command
    monkeypatch.setattr(
        redis.connection.Connection,
        "send_packed_command",
        lambda self, command, *args, **kw: (sent.append(1), send(self, command, *args, **kw))[1],
    )
    store.read(list(range(50)))
    assert len(sent) == 1
    store.append([Event(user, 2, 2.0) for user in range(50)], width=5)
    assert len(sent) == 2


def test_state_load_command_loads_and_then_skips(shared_redis, demo_artifact):
    folder = demo_artifact[0]
    command = ["state", "load", str(folder), "--redis", shared_redis.url, "--prefix", "cli"]
    first = CliRunner().invoke(app, command)
    assert first.exit_code == 0, first.output
    artifact = Artifact.load(folder)
    loaded = f"Loaded {artifact.queries.num_rows} users of {folder} (fingerprint "
    assert f"{loaded}{artifact.fingerprint}) into {shared_redis.url} under 'cli'" in first.output
    again = CliRunner().invoke(app, command)
    assert "0 users" in again.output and f"{artifact.queries.num_rows} held" in again.output
    store = RedisStore(shared_redis.url, prefix="cli")
    users = artifact.query_id_values.tolist()
    assert same_states(store.read(users), artifact_states(artifact, np.arange(len(users))))
    store.close()


def test_state_load_refuses_a_url_of_another_scheme(capsys, monkeypatch, demo_artifact):
    command = ["twotower", "state", "load", str(demo_artifact[0]), "--redis", "http://h:1"]
    monkeypatch.setattr("sys.argv", command)
    with pytest.raises(SystemExit) as exited:
        main()
    assert exited.value.code == 2
    assert "'http://h:1': not a Redis URL" in capsys.readouterr().err


def same_states(a, b) -> bool:
    """Whether two stores' answers hold the same states (ids as text, seen as sets)."""
    return (
        a.known.tolist() == b.known.tolist()
        and a.features == b.features
        and [normal(r) for r in a.recent] == [normal(r) for r in b.recent]
        and [sorted(map(str, s)) for s in a.seen] == [sorted(map(str, s)) for s in b.seen]
    )


def test_after_a_load_every_demo_user_reads_as_the_artifact_holds_it(shared_redis, demo_artifact):
    artifact = Artifact.load(demo_artifact[0])
    store = RedisStore(shared_redis.url, prefix="demo-load")
    assert store.load_artifact(artifact, chunk=64).loaded == artifact.queries.num_rows
    users = artifact.query_id_values.tolist()
    states = store.read(users)
    assert states.known.all() and any(states.recent) and any(states.features)
    assert same_states(states, artifact_states(artifact, np.arange(len(users))))
    assert same_states(states, MemoryStore(artifact).read(users))
    store.close()


def test_the_same_events_change_both_stores_alike(shared_redis, demo_artifact):
    artifact = Artifact.load(demo_artifact[0])
    redis_store, memory = RedisStore(shared_redis.url, prefix="demo-events"), MemoryStore(artifact)
    redis_store.load_artifact(artifact)
    rng = np.random.default_rng(0)
    users = [*artifact.query_id_values.tolist()[:40], 10**6, 10**6 + 1]  # two new users
    items = artifact.item_id_values.tolist()
    logged = rng.choice(artifact.recent.times, 15)  # ties with the artifact's entries
    stamps = [NAN, *logged, *np.round(rng.uniform(logged.min(), logged.max(), 15))]
    width = artifact.pipeline.recent_length
    for _ in range(5):
        events = [
            Event(users[rng.integers(len(users))], items[rng.integers(len(items))], t)
            for t in rng.choice(stamps, 60)
        ]
        held = memory.read(users[:10])  # and entries the users hold already
        events += [Event(u, *r[0]) for u, r in zip(users, held.recent, strict=False) if r]
        redis_store.append(events, width)
        memory.append(events, width)
        assert same_states(redis_store.read(users), memory.read(users))
    redis_store.close()
