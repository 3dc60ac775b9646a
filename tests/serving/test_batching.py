"""Micro-batching: requests that queue up while a batch runs are answered as one batch."""

from __future__ import annotations

import asyncio
import threading

import pytest

from twotower.errors import DataError
from twotower.serving.batching import MicroBatcher
from twotower.serving.query import Query, Result


class GatedRetriever:
    """Answers each query with its own user id; the first batch waits for ``gate``."""

    def __init__(self) -> None:
        self.batches: list[list[Query]] = []
        self.gate = threading.Event()
        self.started = threading.Event()

    def retrieve(self, queries):
        self.batches.append(list(queries))
        self.started.set()
        self.gate.wait(timeout=10)
        if any(q.user == "boom" for q in queries):
            raise RuntimeError("a bug")
        return [DataError("k") if q.k == 99 else Result(q.user, [q.user], [1.0]) for q in queries]


async def _run(batcher: MicroBatcher, retriever: GatedRetriever, requests):
    first = asyncio.ensure_future(batcher.submit([Query(user="first")]))
    await asyncio.to_thread(retriever.started.wait, 10)  # the worker is inside batch 1
    rest = [asyncio.ensure_future(batcher.submit(r)) for r in requests]
    await asyncio.sleep(0.05)  # every request is queued before the gate opens
    retriever.gate.set()
    return await first, await asyncio.gather(*rest, return_exceptions=True)


def test_requests_queued_during_a_batch_form_the_next_one():
    retriever = GatedRetriever()
    batcher = MicroBatcher(lambda: retriever, max_queries=100)
    batcher.start()
    requests = [[Query(user=f"u{i}"), Query(user=f"v{i}", k=99)] for i in range(5)]
    try:
        (first, _), answers = asyncio.run(_run(batcher, retriever, requests))
    finally:
        batcher.stop()
    assert first == [Result("first", ["first"], [1.0])]
    assert [len(b) for b in retriever.batches] == [1, 10]  # five requests, one batch
    for i, (results, used) in enumerate(answers):
        assert results[0] == Result(f"u{i}", [f"u{i}"], [1.0])
        assert isinstance(results[1], DataError)  # its own error, the others unharmed
        assert used is retriever


def test_max_queries_caps_a_batch_but_never_splits_a_request():
    retriever = GatedRetriever()
    batcher = MicroBatcher(lambda: retriever, max_queries=4)
    batcher.start()
    requests = [[Query(user=f"u{i}{j}") for j in range(3)] for i in range(4)]
    try:
        asyncio.run(_run(batcher, retriever, requests))
    finally:
        batcher.stop()
    assert [len(b) for b in retriever.batches] == [1, 6, 6]


def test_a_failing_batch_fails_its_requests_and_the_worker_goes_on():
    retriever = GatedRetriever()
    batcher = MicroBatcher(lambda: retriever, max_queries=2)
    batcher.start()
    requests = [[Query(user="boom")], [Query(user="a")], [Query(user="b")]]
    try:
        _, answers = asyncio.run(_run(batcher, retriever, requests))
    finally:
        batcher.stop()
    assert isinstance(answers[0], RuntimeError) and isinstance(answers[1], RuntimeError)
    assert answers[2][0] == [Result("b", ["b"], [1.0])]


def test_submit_needs_a_running_worker_and_bad_settings_are_refused():
    batcher = MicroBatcher(lambda: GatedRetriever())
    with pytest.raises(RuntimeError, match="not running"):
        asyncio.run(batcher.submit([Query(user=1)]))
    with pytest.raises(ValueError, match="max_queries"):
        MicroBatcher(lambda: GatedRetriever(), max_queries=0)


def test_a_task_runs_between_the_batches_queued_before_and_after_it():
    """Requests queued before a ``between`` task are answered before it runs, those
    queued after it once it returns: never in one batch with the other side's."""
    retriever = GatedRetriever()
    batcher = MicroBatcher(lambda: retriever, max_queries=100)
    batcher.start()
    order = []

    def task():
        order.append([len(b) for b in retriever.batches])
        return "done"

    async def run():
        first = asyncio.ensure_future(batcher.submit([Query(user="first")]))
        await asyncio.to_thread(retriever.started.wait, 10)
        before = [asyncio.ensure_future(batcher.submit([Query(user=f"b{i}")])) for i in range(3)]
        between = asyncio.ensure_future(asyncio.to_thread(batcher.between, task))
        await asyncio.sleep(0.05)  # queued before the next requests
        after = [asyncio.ensure_future(batcher.submit([Query(user=f"a{i}")])) for i in range(2)]
        await asyncio.sleep(0.05)
        retriever.gate.set()
        return await asyncio.gather(first, *before, between, *after)

    try:
        answers = asyncio.run(run())
    finally:
        batcher.stop()
    assert answers[4] == "done"
    assert order == [[1, 3]]  # ran once the three queued before it were answered
    assert [len(b) for b in retriever.batches] == [1, 3, 2]


def test_a_failing_task_raises_to_its_caller_and_the_worker_goes_on():
    retriever = GatedRetriever()
    retriever.gate.set()
    batcher = MicroBatcher(lambda: retriever)
    batcher.start()

    def task():
        raise ValueError("planted")

    async def run():
        with pytest.raises(ValueError, match="planted"):
            await asyncio.to_thread(batcher.between, task)
        return await batcher.submit([Query(user="u")])

    try:
        results, _ = asyncio.run(run())
    finally:
        batcher.stop()
    assert results == [Result("u", ["u"], [1.0])]
    assert batcher.between(lambda: "here") == "here"  # stopped: nothing runs beside it
