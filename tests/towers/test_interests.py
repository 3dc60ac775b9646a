"""Multi-interest query towers: the two extractors (shapes, padding, hand-computed
values), the tower's K vectors, label-aware selection, max-over-interests scores, and
K = 1 as exactly the single-vector tower."""

from __future__ import annotations

import dataclasses
import math

import pyarrow as pa
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from twotower.data.config import SplitConfig
from twotower.data.dataset import Dataset
from twotower.data.splits import split_interactions
from twotower.features.pipeline import FeaturePipeline
from twotower.features.specs import FeaturesConfig, HistoryFeature, IdFeature, OneHotFeature
from twotower.towers.config import MLPConfig, ModelConfig
from twotower.towers.encoders import embedding_table
from twotower.towers.history import (
    INTEREST_EXTRACTORS,
    AttentionPooling,
    HistoryEncoder,
    SelfAttentiveInterests,
    SequenceEncoder,
)
from twotower.towers.history.interests import squash
from twotower.towers.model import TwoTower, embed_rows, interest_scores, select_interests

D, K = 8, 3
HISTORIES = torch.tensor([[5, 3, 2, 0, 0, 0], [7, 0, 0, 0, 0, 0], [4, 11, 9, 1, 6, 8]])


def make(extractor: str, interests: int = K, **spec) -> nn.Module:
    torch.manual_seed(0)
    feature = HistoryFeature(
        "history", "user", "item_id", max_len=6, interests=interests, extractor=extractor, **spec
    )
    return INTEREST_EXTRACTORS[extractor](embedding_table(30, D, sparse=False), feature).eval()


@pytest.mark.parametrize("extractor", INTEREST_EXTRACTORS)
def test_an_extractor_declares_its_k_interests(extractor):
    extract = make(extractor)
    assert isinstance(extract, HistoryEncoder) and not isinstance(extract, SequenceEncoder)
    assert (extract.width, extract.interests, extract.times_input) == (D, K, None)


@pytest.mark.parametrize("extractor", INTEREST_EXTRACTORS)
def test_k_vectors_of_the_table_width_and_distinct(extractor):
    out = make(extractor)(HISTORIES)
    assert out.shape == (3, K, D)
    assert not torch.allclose(out[2, 0], out[2, 1])  # the interests differ


@pytest.mark.parametrize("extractor", INTEREST_EXTRACTORS)
def test_padding_and_blanked_items_change_nothing(extractor):
    extract = make(extractor)
    expected = extract(HISTORIES)
    padded = torch.cat([HISTORIES, torch.zeros(3, 7, dtype=torch.long)], dim=1)
    torch.testing.assert_close(extract(padded), expected, rtol=0, atol=1e-6)
    holes = torch.tensor([[5, 0, 3, 2, 0, 0]])
    torch.testing.assert_close(extract(holes), expected[:1], rtol=0, atol=1e-6)


@pytest.mark.parametrize("extractor", INTEREST_EXTRACTORS)
def test_an_empty_history_gives_zero_interests_with_finite_gradients(extractor):
    extract = make(extractor).train()
    out = extract(torch.tensor([[0, 0, 0, 0, 0, 0], [4, 2, 0, 0, 0, 0]]))
    assert torch.equal(out[0], torch.zeros(K, D))
    out.sum().backward()
    grads = [p.grad for p in extract.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)


def test_self_attentive_interests_by_hand():
    """D = 2, K = 2, two items: head k weighs item j by softmax_j(w2_k . tanh(W1 (e_j + p_j)))."""
    table = nn.Embedding(4, 2)
    feature = HistoryFeature("h", "u", "i", max_len=3, interests=2)
    extract = SelfAttentiveInterests(table, feature)
    extract.project = nn.Linear(2, 2, bias=False)  # W1 = I (ComiRec's 4 D shrunk to D)
    extract.heads = nn.Linear(2, 2, bias=False)
    with torch.no_grad():
        table.weight.copy_(torch.tensor([[0.0, 0.0], [0.0, 0.0], [1.0, 0.0], [0.0, 2.0]]))
        extract.recency.weight.copy_(torch.tensor([[0.5, 0.0], [0.0, 0.0], [0.0, 0.0]]))
        extract.project.weight.copy_(torch.eye(2))
        extract.heads.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
    # keys: item 2 (most recent) (1.5, 0), item 3 (0, 2); head 0 reads the first
    # coordinate: logits tanh(1.5), 0; head 1 the second: 0, tanh(2)
    w0 = math.exp(math.tanh(1.5)) / (math.exp(math.tanh(1.5)) + 1)
    w1 = math.exp(math.tanh(2.0)) / (math.exp(math.tanh(2.0)) + 1)
    expected = torch.tensor([[[w0, 2 * (1 - w0)], [1 - w1, 2 * w1]]])
    out = extract(torch.tensor([[2, 3, 0]]))
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-6)


def routed_by_hand(items: torch.Tensor, maps: torch.Tensor, iterations: int) -> torch.Tensor:
    """Dynamic routing of one history, written as loops. items (L, D), maps (K, D, D)."""
    interests, length = maps.shape[0], items.shape[0]
    votes = [[maps[k] @ items[j] for j in range(length)] for k in range(interests)]
    logits = [[0.0] * length for _ in range(interests)]
    for _ in range(iterations):
        capsules = []
        for k in range(interests):
            total = torch.zeros(items.shape[1])
            for j in range(length):
                weight = math.exp(logits[k][j]) / sum(
                    math.exp(logits[c][j]) for c in range(interests)
                )
                total = total + weight * votes[k][j]
            norm2 = float(total @ total)
            capsules.append(total * norm2 / (1 + norm2) / math.sqrt(norm2))
        for k in range(interests):
            for j in range(length):
                logits[k][j] += float(votes[k][j] @ capsules[k])
    return torch.stack(capsules)


@pytest.mark.parametrize("iterations", [1, 3])
def test_routing_by_hand(iterations):
    extract = make("routing", routing_iterations=iterations)
    history = HISTORIES[2:]  # six items, most recent first
    maps = extract.maps.weight.detach().view(K, D, D)  # S_k: rows k D .. (k + 1) D
    items = extract.table(history[0]).detach()
    torch.testing.assert_close(
        extract(history)[0], routed_by_hand(items, maps, iterations), rtol=1e-5, atol=1e-6
    )


def test_squash_keeps_the_direction_and_maps_the_norm_below_one():
    z = torch.tensor([[3.0, 4.0], [0.0, 0.0]])
    torch.testing.assert_close(
        squash(z), torch.tensor([[0.6, 0.8], [0.0, 0.0]]) * 25 / 26
    )  # |z| = 5
    assert torch.equal(squash(z)[1], torch.zeros(2))


def test_label_aware_selection_takes_each_rows_closest_interest_and_only_its_gradient():
    queries = F.normalize(torch.randn(5, 4, 6, generator=torch.Generator().manual_seed(0)), dim=-1)
    queries.requires_grad_(True)
    targets = F.normalize(torch.randn(5, 6, generator=torch.Generator().manual_seed(1)), dim=-1)
    chosen = select_interests(queries, targets)
    best = [
        max(range(4), key=lambda k, b=b: float(queries[b, k].detach() @ targets[b]))
        for b in range(5)
    ]
    torch.testing.assert_close(chosen, queries[torch.arange(5), best], rtol=0, atol=0)
    chosen.sum().backward()
    touched = queries.grad.abs().sum(dim=-1) > 0  # (5, 4)
    assert touched.sum(dim=1).tolist() == [1] * 5
    assert touched[torch.arange(5), best].all()
    single = torch.randn(5, 6)
    assert select_interests(single, targets) is single


def test_interest_scores_are_each_items_best_interest():
    queries, items = torch.randn(4, 3, 5), torch.randn(7, 5)
    expected = torch.stack(
        [torch.stack([queries[b] @ items[n] for n in range(7)]) for b in range(4)]
    )
    torch.testing.assert_close(interest_scores(queries, items), expected.amax(dim=2))
    torch.testing.assert_close(interest_scores(queries[:, 0], items), queries[:, 0] @ items.T)


def features(**history) -> FeaturesConfig:
    return FeaturesConfig(
        query=[
            IdFeature("user_id", "user"),
            HistoryFeature("history", "user", item_feature="item_id", max_len=4, **history),
            OneHotFeature("gender", "gender"),
        ],
        item=[IdFeature("item_id", "item", dim=16)],
    )


@pytest.fixture(scope="module")
def dataset() -> Dataset:
    interactions = pa.table(
        {
            "query_id": ["u1", "u1", "u1", "u2", "u2", "u3", "u3", "u3"],
            "item_id": ["a", "b", "c", "a", "c", "b", "d", "e"],
            "timestamp": [1, 2, 3, 1, 2, 5, 6, 7],
        }
    )
    users = pa.table({"user": ["u1", "u2", "u3"], "gender": ["F", "M", None]})
    items = pa.table({"item": ["a", "b", "c", "d", "e"]})
    return Dataset.from_tables(interactions, users, items, query_key="user", item_key="item")


def built(dataset: Dataset, specs: FeaturesConfig) -> tuple[TwoTower, FeaturePipeline]:
    split = split_interactions(dataset, SplitConfig(method="leave_last_out"))
    pipeline = FeaturePipeline.fit(specs, dataset, split.train)
    torch.manual_seed(0)
    config = ModelConfig(query=MLPConfig(widths=[12, 8]), item=MLPConfig(widths=[8]))
    return TwoTower.build(config, specs, pipeline).eval(), pipeline


@pytest.mark.parametrize("extractor", INTEREST_EXTRACTORS)
def test_the_tower_runs_its_network_on_each_interest_beside_the_other_features(dataset, extractor):
    model, pipeline = built(dataset, features(interests=K, extractor=extractor))
    tower = model.query_tower
    inputs = pipeline.transform("query", dataset.queries)
    out = tower(inputs)
    assert tower.interests == K and out.shape == (3, K, 8)
    torch.testing.assert_close(out.norm(dim=-1), torch.ones(3, K))
    encoders = tower.encoders.encoders
    interests = encoders["history"](inputs["history"])  # (3, K, 16)
    for k in range(K):
        row = torch.cat(
            [encoders["user_id"](inputs["user_id"]), interests[:, k], inputs["gender"]], dim=1
        )
        torch.testing.assert_close(out[:, k], F.normalize(tower.network(row), dim=-1))
    assert embed_rows(tower, pipeline, "query", dataset.queries).shape == (3, K, 8)
    assert embed_rows(tower, pipeline, "query", dataset.queries.slice(0, 0)).shape == (0, K, 8)


def test_one_interest_is_exactly_the_single_vector_tower(dataset):
    """``interests: 1`` (whatever the extractor) builds today's model, draw for draw."""
    plain, pipeline = built(dataset, features())
    one, _ = built(dataset, features(interests=1, extractor="routing"))
    assert one.state_dict().keys() == plain.state_dict().keys()
    for name, value in plain.state_dict().items():
        assert torch.equal(one.state_dict()[name], value), name
    inputs = pipeline.transform("query", dataset.queries)
    assert torch.equal(one.query_tower(inputs), plain.query_tower(inputs))
    assert one.query_tower.interests == 1


def test_bad_interest_settings_are_refused_with_the_reason():
    with pytest.raises(ValueError, match="interests and routing_iterations must be >= 1"):
        HistoryFeature("h", "u", "i", interests=0)
    with pytest.raises(ValueError, match="encoder 'attention' would go unused"):
        HistoryFeature("h", "u", "i", interests=2, encoder="attention")
    second = HistoryFeature("h2", "u", item_feature="item_id", interests=2)
    with pytest.raises(ValueError, match="only one history feature may have interests > 1"):
        specs = features(interests=2)
        dataclasses.replace(specs, query=[*specs.query, second])


@pytest.mark.parametrize("name", ["attention", *INTEREST_EXTRACTORS])
def test_gradients_are_the_same_on_every_call(name):
    """The packed encoders' backward passes sum in a fixed order whatever the threads
    (an index with repeats would not): an exact resume depends on it."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        torch.manual_seed(0)
        feature = (
            HistoryFeature("h", "u", "i", max_len=64, encoder="attention")
            if name == "attention"
            else HistoryFeature("h", "u", "i", max_len=64, interests=K, extractor=name)
        )
        encoder = (AttentionPooling if name == "attention" else INTEREST_EXTRACTORS[name])(
            embedding_table(500, D, sparse=False), feature
        )
        codes = torch.randint(1, 500, (256, 64), generator=torch.Generator().manual_seed(1))
        codes[torch.rand(256, 64, generator=torch.Generator().manual_seed(2)) < 0.4] = 0

        def gradients() -> list[torch.Tensor]:
            encoder.zero_grad()
            out = encoder(codes)
            (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
            return [p.grad.clone() for p in encoder.parameters()]

        first = gradients()
        for _ in range(3):
            assert all(torch.equal(a, b) for a, b in zip(first, gradients(), strict=True))
    finally:
        torch.set_num_threads(threads)
