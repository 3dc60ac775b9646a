import dataclasses

import numpy as np
import pyarrow as pa
import pytest
import scipy.sparse as sp
import torch

from twotower.data.splits import Split
from twotower.evaluation.metrics import ranking_metrics
from twotower.evaluation.ranking import evaluate


def _lookup(scores: np.ndarray):
    """A score_fn reading rows of a fixed (num_queries, N) score matrix."""
    table = torch.from_numpy(scores.astype(np.float32))

    def score_fn(chunk: np.ndarray) -> torch.Tensor:
        return table[torch.from_numpy(chunk)]

    return score_fn


def _table(pairs: list[tuple[int, int]]) -> pa.Table:
    queries, items = zip(*pairs, strict=True)
    return pa.table({"query_idx": list(queries), "item_idx": list(items)})


SPLIT = Split(
    train=_table([(0, 0), (0, 1), (1, 2), (2, 0)]),
    valid=_table([(0, 2), (1, 3), (2, 0)]),
    test=_table([(0, 1), (0, 3), (1, 3), (2, 5), (3, 4)]),
)
HAND_SCORES = np.array(
    [
        [5.0, 4.0, 3.0, 2.0, 1.0, 0.0],
        [0.0, 1.0, 9.0, 3.0, 3.0, 2.0],
        [1.0, 1.0, 1.0, 1.0, 1.0, 1.0],
        [0.0, 0.0, 0.0, 0.0, 5.0, 0.0],
    ]
)


def _python_evaluation(part: str, exclude_seen: bool, k: int):
    """Per query, with sets: the ranking, the held-out items and recall / hr / mrr."""
    before = ["train"] if part == "valid" else ["train", "valid"]
    seen = [set() for _ in range(4)]
    held = [set() for _ in range(4)]
    for name in before:
        for q, i in zip(*SPLIT.part(name).to_pydict().values(), strict=True):
            seen[q].add(i)
    for q, i in zip(*SPLIT.part(part).to_pydict().values(), strict=True):
        held[q].add(i)
    ranked, relevant, recall, hr, mrr = [], [], [], [], []
    for q in range(4):
        targets = held[q] - seen[q] if exclude_seen else held[q]
        if not targets:
            continue
        pool = [i for i in range(6) if not (exclude_seen and i in seen[q])]
        order = sorted(pool, key=lambda i: (-HAND_SCORES[q, i], i))[:k]
        ranked.append(order + [-1] * (k - len(order)))
        relevant.append(targets)
        hit_ranks = [r for r, i in enumerate(order, start=1) if i in targets]
        recall.append(len(hit_ranks) / len(targets))
        hr.append(float(bool(hit_ranks)))
        mrr.append(1 / hit_ranks[0] if hit_ranks else 0.0)
    return np.array(ranked), relevant, {"recall": recall, "hr": hr, "mrr": mrr}


@pytest.mark.parametrize("part", ["valid", "test"])
@pytest.mark.parametrize("exclude_seen", [True, False])
def test_evaluate_matches_a_python_reference(part: str, exclude_seen: bool) -> None:
    k = 3
    result = evaluate(
        _lookup(HAND_SCORES), SPLIT, part, 4, 6, ks=[k], exclude_seen=exclude_seen, chunk_size=2
    )
    ranked, relevant, simple = _python_evaluation(part, exclude_seen, k)
    assert result[f"{part}/queries"] == len(ranked)
    for name, values in simple.items():
        assert result[f"{part}/{name}@{k}"] == pytest.approx(np.mean(values)), name
    dense = np.zeros((len(relevant), 6), dtype=np.float32)
    for row, items in enumerate(relevant):
        dense[row, sorted(items)] = 1.0
    expected = ranking_metrics(ranked, sp.csr_matrix(dense), [k])
    assert result == {f"{part}/queries": len(ranked)} | {
        f"{part}/{n}": pytest.approx(v) for n, v in expected.items()
    }


def test_evaluate_by_hand_on_test_with_seen_excluded() -> None:
    # Held-out after removing seen items: q0 {3}, q1 {} (dropped), q2 {5}, q3 {4}.
    # Rankings without seen items: q0 [3, 4, 5] (0, 1, 2 seen) -> hit at rank 1;
    # q2 [1, 2, 3] (all tied, lower index first; 0 seen) -> miss; q3 [4, 0, 1] -> rank 1.
    result = evaluate(_lookup(HAND_SCORES), SPLIT, "test", 4, 6, ks=[3])
    assert result["test/queries"] == 3
    assert result["test/recall@3"] == pytest.approx(2 / 3)
    assert result["test/mrr@3"] == pytest.approx(2 / 3)
    assert result["test/ndcg@3"] == pytest.approx(2 / 3)  # (1 + 0 + 1) / 3
    assert result["test/coverage@3"] == pytest.approx(1.0)  # {3, 4, 5, 1, 2, 0}


def test_evaluate_is_independent_of_chunk_size_and_adds_popularity() -> None:
    popularity = np.arange(6, dtype=np.float64)
    results = [
        evaluate(
            _lookup(HAND_SCORES),
            SPLIT,
            "test",
            4,
            6,
            ks=(1, 2),
            chunk_size=c,
            item_popularity=popularity,
        )
        for c in (1, 3, 64)
    ]
    assert results[0] == results[1] == results[2]
    assert "test/popularity@2" in results[0]


def test_evaluate_rejects_an_unknown_part() -> None:
    with pytest.raises(ValueError, match="part"):
        evaluate(_lookup(HAND_SCORES), SPLIT, "train", 4, 6)


@pytest.mark.parametrize("part", ["valid", "test"])
def test_known_popularity_counts_what_was_known_before_the_part(part: str) -> None:
    # queries knowing each item (binary): train q0 {0, 1}, q1 {2}, q2 {0};
    # the test step adds valid q0 {2}, q1 {3}, q2 {0} (already known)
    counts = [2, 1, 1, 0, 0, 0] if part == "valid" else [2, 1, 2, 1, 0, 0]
    given = evaluate(
        _lookup(HAND_SCORES),
        SPLIT,
        part,
        4,
        6,
        ks=[2],
        item_popularity=np.array(counts, np.float32),
    )
    known = evaluate(_lookup(HAND_SCORES), SPLIT, part, 4, 6, ks=[2], item_popularity="known")
    assert known == given and f"{part}/popularity@2" in known


@pytest.mark.parametrize("part", ["valid", "test"])
def test_queries_ranked_chunk_by_chunk_give_the_whole_metrics(part: str) -> None:
    """``evaluate_chunks`` over the queries split into chunks of rows (each its own
    score function, held-out and seen rows) equals one ``evaluate`` of them all,
    coverage and popularity included."""
    from twotower.data.matrix import interaction_matrix, known_before
    from twotower.evaluation.ranking import HeldOut, evaluate_chunks

    popularity = np.arange(6, dtype=np.float64)
    whole = evaluate(
        _lookup(HAND_SCORES), SPLIT, part, 4, 6, ks=(1, 2, 5), item_popularity=popularity
    )
    held_out = interaction_matrix(SPLIT.part(part), 4, 6)
    seen = known_before(SPLIT, part, 4, 6)
    chunks = [
        HeldOut(_lookup(HAND_SCORES[rows]), held_out[rows], seen[rows])
        for rows in (slice(0, 1), slice(1, 3), slice(3, 4))
    ]
    got = evaluate_chunks(chunks, part, 6, ks=(1, 2, 5), item_popularity=popularity)
    assert got.keys() == whole.keys()
    assert {type(value) for value in got.values()} <= {float, int}  # plain, for checkpoints
    for name, value in whole.items():
        assert got[name] == pytest.approx(value, rel=1e-12, nan_ok=True), name


def test_new_items_metrics_restrict_the_held_out_items_to_them() -> None:
    # Items 4 and 5 are in test alone: say they are the new items. Held-out new items:
    # q2 {5}, q3 {4}, ranked as the whole test ranks them: q2 [1, 2, 3, 4, 5] (all
    # tied, lower index first; 0 seen) -> item 5 at rank 5; q3 [4, 0, 1, 2, 3] -> rank 1.
    split = dataclasses.replace(SPLIT, new_items=np.array([4, 5]))
    result = evaluate(_lookup(HAND_SCORES), split, "test", 4, 6, ks=[1, 5], chunk_size=3)
    assert result["test/new_items/queries"] == 2
    assert result["test/new_items/recall@1"] == pytest.approx(0.5)
    assert result["test/new_items/recall@5"] == pytest.approx(1.0)
    assert result["test/new_items/mrr@5"] == pytest.approx((1 / 5 + 1) / 2)
    assert result["test/new_items/ndcg@5"] == pytest.approx((1 / np.log2(6) + 1) / 2)
    # the other held-out items alone: q0's 3 (q1's 3 is seen), first of q0's 3, 4, 5
    assert result["test/known_items/queries"] == 1
    assert result["test/known_items/recall@1"] == result["test/known_items/mrr@5"] == 1.0
    whole = evaluate(_lookup(HAND_SCORES), SPLIT, "test", 4, 6, ks=[1, 5])
    alone = ("/new_items/", "/known_items/")
    assert {k: v for k, v in result.items() if not any(a in k for a in alone)} == whole
    valid = evaluate(_lookup(HAND_SCORES), split, "valid", 4, 6, ks=[1, 5])
    assert not [k for k in valid if "new_items" in k]  # new items have no valid pairs


def test_validation_new_items_are_reported_on_validation() -> None:
    # Item 3 is validation's new item: q1's valid pair. q1 ranks [3, 4, 5, 1, 0] (2
    # seen; 3 and 4 tie at 3.0, the lower index first) -> rank 1; the known pair left
    # is q0's 2, ranked [2, 3, 4, 5] (0 and 1 seen) -> rank 1.
    split = dataclasses.replace(SPLIT, new_items_valid=np.array([3]))
    valid = evaluate(_lookup(HAND_SCORES), split, "valid", 4, 6, ks=[1])
    assert valid["valid/new_items/queries"] == valid["valid/known_items/queries"] == 1
    assert valid["valid/new_items/recall@1"] == valid["valid/known_items/recall@1"] == 1.0
    test = evaluate(_lookup(HAND_SCORES), split, "test", 4, 6, ks=[1])
    assert not [k for k in test if "_items/" in k]  # test's own new items: none here
