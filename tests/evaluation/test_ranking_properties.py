"""Property test: ``evaluate`` equals an obvious Python evaluation on random small cases,
for any chunk size, with and without seen-item exclusion."""

from __future__ import annotations

import math

import numpy as np
import pyarrow as pa
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from twotower.data.splits import Split
from twotower.evaluation.ranking import evaluate


@st.composite
def cases(draw):
    num_queries = draw(st.integers(1, 6))
    num_items = draw(st.integers(1, 8))
    pair = st.tuples(st.integers(0, num_queries - 1), st.integers(0, num_items - 1))
    parts = {name: draw(st.lists(pair, max_size=12)) for name in ("train", "valid", "test")}
    # few distinct values, so ties are common
    scores = draw(
        st.lists(
            st.lists(st.integers(-2, 2), min_size=num_items, max_size=num_items),
            min_size=num_queries,
            max_size=num_queries,
        )
    )
    ks = draw(st.lists(st.integers(1, num_items + 2), min_size=1, max_size=3, unique=True))
    return num_queries, num_items, parts, np.array(scores, dtype=np.float32), ks


def table(pairs):
    queries = [q for q, _ in pairs]
    items = [i for _, i in pairs]
    return pa.table(
        {"query_idx": pa.array(queries, pa.int64()), "item_idx": pa.array(items, pa.int64())}
    )


def python_evaluation(num_queries, num_items, parts, scores, ks, part, exclude_seen):
    """Sets and sorted lists, one query at a time."""
    seen = [set() for _ in range(num_queries)]
    for name in ["train"] if part == "valid" else ["train", "valid"]:
        for q, i in parts[name]:
            seen[q].add(i)
    held = [set() for _ in range(num_queries)]
    for q, i in parts[part]:
        held[q].add(i)
    sums = {f"{m}@{k}": 0.0 for k in ks for m in ("recall", "hr", "ndcg", "mrr", "precision")}
    count = 0
    for q in range(num_queries):
        targets = held[q] - seen[q] if exclude_seen else held[q]
        if not targets:
            continue
        count += 1
        pool = [i for i in range(num_items) if not (exclude_seen and i in seen[q])]
        order = sorted(pool, key=lambda i: (-scores[q, i], i))
        for k in ks:
            top = order[:k]
            hits = [rank for rank, i in enumerate(top, start=1) if i in targets]
            ideal = sum(1 / math.log2(r + 1) for r in range(1, min(k, len(targets)) + 1))
            sums[f"recall@{k}"] += len(hits) / len(targets)
            sums[f"hr@{k}"] += float(bool(hits))
            sums[f"ndcg@{k}"] += sum(1 / math.log2(r + 1) for r in hits) / ideal
            sums[f"mrr@{k}"] += 1 / hits[0] if hits else 0.0
            sums[f"precision@{k}"] += len(hits) / k
    return count, {name: value / count for name, value in sums.items()} if count else {}


@settings(max_examples=150, deadline=None)
@given(cases(), st.sampled_from(["valid", "test"]), st.booleans(), st.integers(1, 7))
def test_evaluate_equals_python_for_any_chunk_size(case, part, exclude_seen, chunk_size):
    num_queries, num_items, parts, scores, ks = case
    split = Split(**{name: table(pairs) for name, pairs in parts.items()})
    matrix = torch.from_numpy(scores)
    result = evaluate(
        lambda chunk: matrix[torch.from_numpy(chunk)],
        split,
        part,
        num_queries,
        num_items,
        ks=ks,
        exclude_seen=exclude_seen,
        chunk_size=chunk_size,
    )
    count, expected = python_evaluation(
        num_queries, num_items, parts, scores, ks, part, exclude_seen
    )
    assert result[f"{part}/queries"] == count
    for name, value in expected.items():
        assert result[f"{part}/{name}"] == pytest.approx(value, abs=1e-6), name
