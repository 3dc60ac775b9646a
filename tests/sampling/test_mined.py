"""Mined negatives: each query's window of the model's ranking, its positives excluded,
checked against a brute-force numpy ranking; draws, expected counts, limits."""

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from twotower.errors import ConfigError
from twotower.sampling import MinedNegatives, UniformSampler

Q, N, D = 12, 40, 6
FIRST, LAST = 4, 15  # ranks 4..15, 1-based


def _problem(seed: int = 0) -> tuple[np.ndarray, np.ndarray, list[set[int]]]:
    """Random query and item vectors and each query's positives: query 0 has so many
    that fewer than LAST items remain, query 1 so many that none reaches rank FIRST."""
    rng = np.random.default_rng(seed)
    queries = rng.standard_normal((Q, D)).astype(np.float32)
    items = rng.standard_normal((N, D)).astype(np.float32)
    positives = [set(rng.choice(N, size=int(rng.integers(1, 8)), replace=False)) for _ in range(Q)]
    positives[0] = set(range(N - 10))  # 10 items left: ranks 4..10 only
    positives[1] = set(range(N - 2))  # 2 items left: none in the window
    return queries, items, positives


def _exclude(positives: list[set[int]]) -> sp.csr_matrix:
    rows = [q for q, items in enumerate(positives) for _ in items]
    cols = [i for items in positives for i in items]
    return sp.csr_matrix((np.ones(len(rows)), (rows, cols)), shape=(Q, N))


def _brute_force(queries, items, positives) -> list[list[int]]:
    """Each query's items at ranks FIRST..LAST: score every item with numpy, sort,
    drop the positives, take the window."""
    windows = []
    for q in range(Q):
        scores = items @ queries[q]
        ranked = [int(i) for i in np.argsort(-scores, kind="stable") if i not in positives[q]]
        windows.append(ranked[FIRST - 1 : LAST])
    return windows


def _refreshed(seed: int = 0, chunk_size: int = 5) -> tuple[MinedNegatives, list[set[int]], list]:
    queries, items, positives = _problem(seed)
    mined = MinedNegatives(Q, N, (FIRST, LAST), max_candidates=10_000)

    def score(chunk: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(queries[chunk] @ items.T)

    mined.refresh(score, np.arange(Q), _exclude(positives), chunk_size)
    return mined, positives, _brute_force(queries, items, positives)


@pytest.mark.parametrize("chunk_size", [1, 5, 64])
def test_candidates_are_the_brute_force_window_without_positives(chunk_size):
    for seed in range(3):
        mined, positives, expected = _refreshed(seed, chunk_size)
        assert mined.ready
        for q in range(Q):
            count = int(mined.counts[q])
            row = mined.candidates[q].tolist()
            assert sorted(row[:count]) == sorted(expected[q]), (seed, q)
            assert set(row[:count]).isdisjoint(positives[q])
            assert row[count:] == [N] * (LAST - FIRST + 1 - count)  # padding
    assert int(mined.counts[0]) == 7 and int(mined.counts[1]) == 0


def test_queries_not_ranked_keep_no_candidates():
    queries, items, positives = _problem()
    mined = MinedNegatives(Q, N, (FIRST, LAST), max_candidates=10_000)
    mined.refresh(
        lambda chunk: torch.from_numpy(queries[chunk] @ items.T),
        np.array([2, 5]),
        _exclude(positives),
        chunk_size=4,
    )
    assert torch.count_nonzero(mined.counts).item() == 2
    assert int(mined.counts[2]) == int(mined.counts[5]) == LAST - FIRST + 1


def test_draws_come_from_the_row_queries_window_and_cover_it():
    mined, positives, expected = _refreshed()
    rows = torch.tensor([3, 3, 0, 7, 1])  # query 1 has no candidate: the fallback draws
    row_positives = torch.tensor([min(positives[int(q)]) for q in rows])
    drawn = mined.sample(
        rows, row_positives, 400, torch.Generator().manual_seed(0), UniformSampler(N)
    )
    assert drawn.shape == (5, 400) and drawn.dtype == torch.int64
    for b, q in enumerate(rows.tolist()):
        values = set(drawn[b].tolist())
        if q == 1:
            assert len(values) > 10 and row_positives[b].item() not in values
        else:
            assert values == set(expected[q])  # only the window, and all of it in 400 draws


def test_same_generator_state_gives_same_draws():
    mined, positives, _ = _refreshed()
    rows, row_positives = torch.arange(Q), torch.zeros(Q, dtype=torch.int64)

    def draw(seed):
        generator = torch.Generator().manual_seed(seed)
        return mined.sample(rows, row_positives, 8, generator, UniformSampler(N))

    assert torch.equal(draw(3), draw(3)) and not torch.equal(draw(3), draw(4))


def test_expected_counts_by_hand():
    mined, _, expected = _refreshed()
    rows = torch.tensor([3, 0, 1])
    items = torch.arange(N)
    got = mined.expected_counts(rows, items, 2)  # 2 draws a row
    assert got.shape == (3, N) and got.dtype == torch.float64
    for b, q in enumerate(rows.tolist()):
        for i in range(N):
            # query 1 has no candidate: its draws are uniform, 2 / N each
            inside = 2 / len(expected[q]) if i in expected[q] else 0.0
            want = 2 / N if q == 1 else inside
            assert got[b, i].item() == pytest.approx(want)
    per_row = mined.expected_counts(rows, items[None, :].expand(3, -1), 2)
    assert torch.equal(per_row, got)


@pytest.mark.parametrize("dense_cells", [0, 2**26])  # sorted lookups; a table of flags
def test_membership_is_the_windows_by_either_path(monkeypatch, dense_cells):
    monkeypatch.setattr("twotower.sampling.mined.DENSE_CELLS", dense_cells)
    mined, _, expected = _refreshed()
    rows = torch.tensor([3, 0, 1, 3, 7])  # repeated and candidate-less queries
    items = torch.randint(0, N, (len(rows), 50), generator=torch.Generator().manual_seed(0))
    got = mined.contains(rows, items)
    pairs = zip(rows.tolist(), items.tolist(), strict=True)
    want = [[i in expected[q] for i in row] for q, row in pairs]
    assert got.tolist() == want
    assert got[2].sum() == 0  # query 1 has no candidate


def test_a_table_above_the_bound_is_refused_with_its_size():
    with pytest.raises(ConfigError, match=r"1,000 queries x 400 ranks = 400,000 .*max_candidates"):
        MinedNegatives(1_000, 5_000, (101, 500), max_candidates=399_999)
    MinedNegatives(1_000, 5_000, (101, 500), max_candidates=400_000)


def test_state_round_trip():
    mined, _, _ = _refreshed()
    other = MinedNegatives(Q, N, (FIRST, LAST), max_candidates=10_000)
    assert not other.ready
    other.load_state_dict(mined.state_dict())
    assert other.ready
    assert torch.equal(other.candidates, mined.candidates)
    assert torch.equal(other.counts, mined.counts)
    with pytest.raises(ValueError, match="do not fit"):
        MinedNegatives(Q + 1, N, (FIRST, LAST), 10_000).load_state_dict(mined.state_dict())


def test_a_share_of_a_batch_draws_what_those_rows_of_the_whole_would():
    mined, _, _ = _refreshed()
    rows, positives = torch.arange(2, Q), torch.zeros(Q - 2, dtype=torch.int64)

    def draw(part: slice, before: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(5)
        return mined.sample(rows[part], positives[part], 3, generator, UniformSampler(N), before)

    whole = draw(slice(None), 0)
    shares = torch.cat([draw(slice(0, 4), 0), draw(slice(4, None), 4)])
    assert torch.equal(whole, shares)
