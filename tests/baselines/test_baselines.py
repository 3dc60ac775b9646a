import numpy as np
import pyarrow as pa
import pytest
import scipy.sparse as sp
import torch

from twotower.baselines.ease import EASE
from twotower.baselines.itemknn import ItemKNN
from twotower.baselines.popularity import Popularity
from twotower.baselines.run import BASELINES
from twotower.data.matrix import interaction_matrix
from twotower.data.splits import Split
from twotower.evaluation.ranking import evaluate
from twotower.index.topk import top_k


def _train(seed: int = 0, shape: tuple[int, int] = (40, 15), p: float = 0.3) -> sp.csr_matrix:
    rng = np.random.default_rng(seed)
    return sp.csr_matrix((rng.random(shape) < p).astype(np.float32))


def _dense_cosine(train: np.ndarray, shrink: float = 0.0) -> np.ndarray:
    """Cosine between item columns, zero where an item has no interaction, zero diagonal."""
    x = train.astype(np.float64)
    norms = np.linalg.norm(x, axis=0)
    denominator = np.outer(norms, norms) + shrink
    sim = np.divide(x.T @ x, denominator, out=np.zeros((x.shape[1],) * 2), where=denominator > 0)
    np.fill_diagonal(sim, 0.0)
    return sim


def test_popularity_ranks_items_by_train_count() -> None:
    # Item counts: item 0 -> 1, item 1 -> 3, item 2 -> 0, item 3 -> 2.
    train = sp.csr_matrix(np.array([[0, 1, 0, 1], [1, 1, 0, 0], [0, 1, 0, 1]], dtype=np.float32))
    model = Popularity().fit(train)
    np.testing.assert_array_equal(model.counts, [1, 3, 0, 2])
    ids, _ = top_k(model.score, np.array([0, 2]), k=4)
    np.testing.assert_array_equal(ids, [[1, 3, 0, 2], [1, 3, 0, 2]])


@pytest.mark.parametrize("shrink", [0.0, 2.5])
def test_itemknn_matches_dense_cosine(shrink: float) -> None:
    train = _train(1)
    model = ItemKNN(neighbors=None, shrink=shrink, block_size=4).fit(train)
    sim = _dense_cosine(train.toarray(), shrink)
    np.testing.assert_allclose(model.similarity.toarray(), sim, rtol=1e-6)
    rows = np.array([0, 5, 39])
    expected = train.toarray()[rows].astype(np.float64) @ sim
    np.testing.assert_allclose(model.score(rows).numpy(), expected, rtol=1e-5)


def test_itemknn_keeps_each_items_top_neighbors_with_ties_to_lower_index() -> None:
    train = _train(2, shape=(30, 12))
    neighbors = 3
    model = ItemKNN(neighbors=neighbors, block_size=5).fit(train)
    sim = _dense_cosine(train.toarray())
    expected = np.zeros_like(sim)
    for i, row in enumerate(sim):
        best = sorted(range(len(row)), key=lambda j: (-row[j], j))[:neighbors]
        expected[i, best] = row[best]
    np.testing.assert_allclose(model.similarity.toarray(), expected, rtol=1e-6)
    assert np.diff(model.similarity.indptr).max() <= neighbors


def test_ease_matches_the_closed_form() -> None:
    train = _train(3)
    l2 = 7.0
    model = EASE(l2=l2).fit(train)
    x = train.toarray().astype(np.float64)
    precision = np.linalg.inv(x.T @ x + l2 * np.eye(x.shape[1]))
    weights = np.eye(x.shape[1]) - precision / np.diag(precision)[None, :]
    np.testing.assert_allclose(model.weights, weights, atol=1e-6)
    assert (np.diag(model.weights) == 0).all()
    rows = np.array([1, 2, 30])
    np.testing.assert_allclose(model.score(rows).numpy(), x[rows] @ weights, atol=1e-5)


def test_ease_rejects_a_non_positive_penalty() -> None:
    with pytest.raises(ValueError, match="l2"):
        EASE(l2=0.0)


@pytest.mark.parametrize("name", sorted(BASELINES))
class TestBaselineContract:
    def test_fit_returns_self_and_scores_have_the_right_shape(self, name: str) -> None:
        train = _train()
        model = BASELINES[name]()
        assert model.fit(train) is model
        scores = model.score(np.array([3, 0, 3, 17]))
        assert isinstance(scores, torch.Tensor)
        assert scores.dtype == torch.float32
        assert scores.shape == (4, train.shape[1])
        assert torch.isfinite(scores).all()

    def test_scores_are_deterministic_and_batch_independent(self, name: str) -> None:
        train = _train()
        rows = np.arange(train.shape[0])
        first = BASELINES[name]().fit(train).score(rows)
        again = BASELINES[name]().fit(train).score(rows)
        assert torch.equal(first, again)
        for chunk in (rows[:1], rows[5:12], rows[::-3].copy()):
            batch = BASELINES[name]().fit(train).score(chunk)
            assert torch.equal(batch, first[torch.from_numpy(chunk)])

    def test_score_before_fit_fails(self, name: str) -> None:
        with pytest.raises(RuntimeError, match="fit"):
            BASELINES[name]().score(np.array([0]))

    def test_is_a_score_fn_for_evaluate(self, name: str) -> None:
        # Query q interacted with items q..q+3 (mod 10); the last one is held out.
        queries = np.repeat(np.arange(20), 4)
        items = (queries + np.tile(np.arange(4), 20)) % 10
        last = np.tile(np.arange(4) == 3, 20)
        train = pa.table({"query_idx": queries[~last], "item_idx": items[~last]})
        test = pa.table({"query_idx": queries[last], "item_idx": items[last]})
        split = Split(train=train, valid=train.slice(0, 0), test=test)
        model = BASELINES[name]().fit(interaction_matrix(train, 20, 10))
        result = evaluate(model.score, split, "test", 20, 10, ks=[1, 5], chunk_size=7)
        assert result["test/queries"] == 20
        assert 0.0 <= result["test/recall@5"] <= 1.0


@pytest.mark.parametrize("name", sorted(BASELINES))
def test_a_baseline_is_evaluated_by_group_as_the_model_is(name: str) -> None:
    """``evaluate_baseline`` reports the groups ``evaluate`` reports for the same scores:
    items by training popularity, queries by activity, as of the part."""
    from twotower.baselines.run import evaluate_baseline
    from twotower.data.matrix import known_before
    from twotower.demo import demo_config
    from twotower.sources import MemorySource, load_data

    config = demo_config(
        ["data.synthetic.num_queries=120", "data.synthetic.num_items=60", "split.method=random"]
    )
    dataset, split = load_data(config)
    Q, N = dataset.num_queries, dataset.num_items
    got = evaluate_baseline(name, MemorySource(dataset, split), [5, 10], parts=("test",))
    model = BASELINES[name]().fit(known_before(split, "test", Q, N))
    expected = evaluate(
        model.score, split, "test", Q, N, [5, 10], item_popularity="known", groups=True
    )
    assert {"test/groups/item:tail/ndcg@10", "test/groups/query:few/hr@5"} <= got.keys()
    assert got.keys() == expected.keys()
    for key, value in expected.items():
        assert got[key] == pytest.approx(value, rel=1e-6, abs=1e-9), key
