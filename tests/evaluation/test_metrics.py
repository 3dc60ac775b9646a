import math
from collections import defaultdict

import numpy as np
import pytest
import scipy.sparse as sp

from twotower.evaluation.metrics import ranking_metrics


def _relevant(sets: list[set[int]], num_items: int) -> sp.csr_matrix:
    dense = np.zeros((len(sets), num_items), dtype=np.float32)
    for row, items in enumerate(sets):
        dense[row, sorted(items)] = 1.0
    return sp.csr_matrix(dense)


# N = 5 items. Row 0 hits at ranks 2 and 4 of its 3 relevant items; row 1 hits at rank 1
# of its single item, then padding; row 2 has no relevant item, so it is not counted.
HAND_RANKED = np.array([[3, 1, 4, 0], [2, -1, -1, -1], [0, 1, 2, 3]])
HAND_RELEVANT = [{0, 1, 2}, {2}, set()]
HAND_POPULARITY = np.array([0.0, 1.0, 10.0, 100.0, 1000.0])
L3, L5 = math.log2(3), math.log2(5)
HAND_EXPECTED = {
    # row 0: 1 hit of 3; row 1: 1 of 1 -> (1/3 + 1) / 2
    "recall@2": (1 / 3 + 1) / 2,
    # row 0: 2 hits of 3 -> (2/3 + 1) / 2
    "recall@4": (2 / 3 + 1) / 2,
    "hr@2": 1.0,
    "hr@4": 1.0,
    # row 0: DCG = 1/log2(3), IDCG over min(2, 3) = 2 items = 1 + 1/log2(3); row 1: 1/1
    "ndcg@2": ((1 / L3) / (1 + 1 / L3) + 1.0) / 2,
    # row 0: DCG = 1/log2(3) + 1/log2(5), IDCG over 3 items = 1 + 1/log2(3) + 1/log2(4)
    "ndcg@4": ((1 / L3 + 1 / L5) / (1 + 1 / L3 + 0.5) + 1.0) / 2,
    # first hit at rank 2 in row 0, rank 1 in row 1 -> (1/2 + 1) / 2
    "mrr@2": 0.75,
    "mrr@4": 0.75,
    # row 0: 1/2, row 1: 1/2 (padding is a miss) -> 1/2
    "precision@2": 0.5,
    # row 0: 2/4, row 1: 1/4 -> 3/8
    "precision@4": 0.375,
    # counted rows' top 2: {3, 1} | {2} = 3 of 5 items (row 2 is not counted)
    "coverage@2": 0.6,
    # {3, 1, 4, 0} | {2} = 5 of 5
    "coverage@4": 1.0,
    # row 0: (100 + 1) / 2 = 50.5; row 1: 10 (padding ignored) -> 30.25
    "popularity@2": 30.25,
    # row 0: (100 + 1 + 1000 + 0) / 4 = 275.25; row 1: 10 -> 142.625
    "popularity@4": 142.625,
}


@pytest.mark.parametrize(("name", "expected"), sorted(HAND_EXPECTED.items()))
def test_hand_computed_metric(name: str, expected: float) -> None:
    metrics = ranking_metrics(
        HAND_RANKED, _relevant(HAND_RELEVANT, 5), ks=[2, 4], item_popularity=HAND_POPULARITY
    )
    assert metrics[name] == pytest.approx(expected)


def test_keys_follow_ks_and_popularity_is_optional() -> None:
    metrics = ranking_metrics(HAND_RANKED, _relevant(HAND_RELEVANT, 5), ks=[4, 2])
    names = ["recall", "hr", "ndcg", "mrr", "precision", "coverage"]
    assert list(metrics) == [f"{n}@{k}" for k in (4, 2) for n in names]
    assert all(isinstance(v, float) for v in metrics.values())


def test_ndcg_is_one_for_a_perfect_ranking() -> None:
    ranked = np.array([[4, 2, 0, 1]])
    metrics = ranking_metrics(ranked, _relevant([{2, 4}], 5), ks=[1, 2, 4])
    assert metrics["ndcg@1"] == pytest.approx(1.0)
    assert metrics["ndcg@2"] == pytest.approx(1.0)
    assert metrics["ndcg@4"] == pytest.approx(1.0)
    assert metrics["recall@1"] == pytest.approx(0.5)


def test_cutoff_beyond_the_ranking_counts_as_padding() -> None:
    # One hit at rank 1, 2 items ranked, k = 4: precision 1/4, recall 1/2.
    metrics = ranking_metrics(np.array([[1, 3]]), _relevant([{1, 2}], 4), ks=[4])
    assert metrics["precision@4"] == pytest.approx(0.25)
    assert metrics["recall@4"] == pytest.approx(0.5)


def test_no_counted_row_gives_nan_means() -> None:
    metrics = ranking_metrics(np.array([[0, 1]]), _relevant([set()], 3), ks=[2])
    assert math.isnan(metrics["recall@2"])
    assert math.isnan(metrics["ndcg@2"])
    assert metrics["coverage@2"] == 0.0


def test_non_canonical_relevant_matrix_is_binarized() -> None:
    # A duplicated entry and an explicit zero: item 1 relevant once, item 2 not at all.
    relevant = sp.csr_matrix(
        (np.array([1.0, 1.0, 0.0]), np.array([1, 1, 2]), np.array([0, 3])), shape=(1, 3)
    )
    metrics = ranking_metrics(np.array([[2, 1]]), relevant, ks=[2])
    assert metrics["recall@2"] == pytest.approx(1.0)
    assert metrics["mrr@2"] == pytest.approx(0.5)
    assert relevant.nnz == 3  # the caller's matrix is untouched


@pytest.mark.parametrize(
    ("ranked", "ks", "match"),
    [
        (np.array([[0, 5]]), [1], "outside"),
        (np.array([[0, -2]]), [1], "outside"),
        (np.array([0, 1]), [1], "ranked must be"),
        (np.array([[0, 1]]), [0], "ks"),
        (np.array([[0, 1]]), [], "ks"),
    ],
)
def test_bad_input_is_rejected(ranked: np.ndarray, ks: list[int], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        ranking_metrics(ranked, _relevant([{0}], 5), ks=ks)


def _reference(
    ranked: np.ndarray, sets: list[set[int]], ks: list[int], num_items: int, popularity
) -> dict[str, float]:
    """The definitions, one row and one rank at a time."""
    counted = [q for q in range(len(sets)) if sets[q]]
    result = {}
    for k in ks:
        per_row = defaultdict(list)
        covered = set()
        for q in counted:
            top = [int(i) for i in ranked[q][:k]]
            items = [i for i in top if i >= 0]
            covered.update(items)
            hit_ranks = [r for r, i in enumerate(top, start=1) if i >= 0 and i in sets[q]]
            dcg = sum(1 / math.log2(r + 1) for r in hit_ranks)
            idcg = sum(1 / math.log2(r + 1) for r in range(1, min(k, len(sets[q])) + 1))
            per_row["recall"].append(len(hit_ranks) / len(sets[q]))
            per_row["hr"].append(1.0 if hit_ranks else 0.0)
            per_row["ndcg"].append(dcg / idcg)
            per_row["mrr"].append(1 / hit_ranks[0] if hit_ranks else 0.0)
            per_row["precision"].append(len(hit_ranks) / k)
            pops = [popularity[i] for i in items]
            per_row["popularity"].append(sum(pops) / len(pops) if pops else 0.0)
        for name, values in per_row.items():
            result[f"{name}@{k}"] = sum(values) / len(values)
        result[f"coverage@{k}"] = len(covered) / num_items
    return result


def _random_case(seed: int) -> tuple[np.ndarray, list[set[int]], np.ndarray]:
    rng = np.random.default_rng(seed)
    num_rows, num_items, width = 40, 25, 8
    ranked = np.full((num_rows, width), -1, dtype=np.int64)
    for q in range(num_rows):
        shown = rng.integers(0, width + 1)  # 0..width real items, the rest padding
        ranked[q, :shown] = rng.permutation(num_items)[:shown]
    sets = [set(np.flatnonzero(rng.random(num_items) < 0.2).tolist()) for _ in range(num_rows)]
    for q in rng.choice(num_rows, size=6, replace=False):
        sets[q] = set()  # rows that must not be counted
    return ranked, sets, rng.random(num_items) * 100


@pytest.mark.parametrize("seed", range(6))
def test_vectorized_metrics_equal_the_python_reference(seed: int) -> None:
    ranked, sets, popularity = _random_case(seed)
    ks = [1, 3, 5, 8, 12]
    num_items = len(popularity)
    metrics = ranking_metrics(ranked, _relevant(sets, num_items), ks, item_popularity=popularity)
    expected = _reference(ranked, sets, ks, num_items, popularity)
    assert set(metrics) == set(expected)
    for name, value in expected.items():
        assert metrics[name] == pytest.approx(value, abs=1e-12), name
