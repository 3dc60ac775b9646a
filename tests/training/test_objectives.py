"""Objectives assemble sampler, corrections and loss in the documented order."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from twotower.losses import ListwiseSoftmax, TripletHinge
from twotower.sampling import CountFrequency, InBatchSampler, MixedSampler
from twotower.training.config import (
    HingeConfig,
    InBatchConfig,
    ListwiseConfig,
    LogisticConfig,
    MixedConfig,
    PointwiseConfig,
)
from twotower.training.objectives import RowNegatives, SharedCandidates, build_objective

# Item vectors of a 4-item corpus (unit vectors in 2-d) and two query vectors.
ITEMS = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8], [0.8, 0.6]])


def embed(items: torch.Tensor) -> torch.Tensor:
    return ITEMS[items]


def test_in_batch_applies_logq_then_masks_the_repeated_positive():
    counts = np.array([1, 2, 3, 4])  # log q = log(count / 10)
    objective = SharedCandidates(
        InBatchSampler(CountFrequency(counts)),
        CountFrequency(counts),
        logq=True,
        mask_hits=True,
        hard_negatives=0,
    )
    query = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]])
    positives = torch.tensor([2, 1, 2])  # item 2 is the positive of rows 0 and 2
    scale = torch.tensor(2.0)
    loss = objective(query, positives, embed, scale, torch.Generator())

    # The oracle, one row at a time: logit = 2 * cos - log(count/10); row b's
    # candidates are the batch's positives, minus other copies of its own positive.
    expected = 0.0
    for b in range(3):
        logits = []
        for j in range(3):
            if j != b and positives[j] == positives[b]:
                continue
            cos = float(query[b] @ ITEMS[positives[j]])
            logits.append((j == b, 2.0 * cos - math.log(counts[positives[j]] / 10)))
        positive = next(value for is_pos, value in logits if is_pos)
        expected -= positive - math.log(sum(math.exp(value) for _, value in logits))
    assert float(loss) == pytest.approx(expected / 3, rel=1e-6)


def test_mixed_candidates_are_the_batch_plus_sampled_items():
    counts = np.array([5, 1, 1, 1])
    frequency = CountFrequency(counts)
    objective = SharedCandidates(
        MixedSampler(frequency, num_items=4, num_sampled=3), frequency, True, True, 0
    )
    seen = []

    def recording_embed(items):
        seen.append(items.clone())
        return embed(items)

    query = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    loss = objective(query, torch.tensor([0, 1]), recording_embed, torch.tensor(1.0), None)
    assert torch.isfinite(loss)
    assert set(seen[0].tolist()) <= {0, 1, 2, 3} and {0, 1} <= set(seen[0].tolist())


def test_row_negatives_equal_to_the_positive_are_masked():
    class Fixed:  # always returns these negatives; row 0's second one is its positive
        def sample(self, positives, n, generator):
            return torch.tensor([[1, 0], [0, 2]])

    objective = RowNegatives(ListwiseSoftmax(), Fixed(), num_negatives=2, scaled=True)
    query = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    positives = torch.tensor([0, 1])
    loss = objective(query, positives, embed, torch.tensor(1.0), None)
    # row 0: pos cos 1, one negative (item 1, cos 0); row 1: pos 1, negs cos 0 and 0.8
    row0 = -(1 - math.log(math.exp(1) + math.exp(0)))
    row1 = -(1 - math.log(math.exp(1) + math.exp(0) + math.exp(0.8)))
    assert float(loss) == pytest.approx((row0 + row1) / 2, rel=1e-6)


def test_triplet_objectives_use_raw_cosines_not_the_temperature():
    class Fixed:
        def sample(self, positives, n, generator):
            return torch.tensor([[1]])

    objective = RowNegatives(TripletHinge(margin=0.5), Fixed(), 1, scaled=False)
    query = torch.tensor([[0.6, 0.8]])
    loss = objective(query, torch.tensor([2]), embed, torch.tensor(20.0), None)
    # max(0, 0.5 + cos(q, item1) - cos(q, item2)) = max(0, 0.5 + 0.8 - 1.0) = 0.3
    assert float(loss) == pytest.approx(0.3, rel=1e-6)


@pytest.mark.parametrize(
    "config",
    [
        PointwiseConfig(),
        HingeConfig(),
        LogisticConfig(),
        ListwiseConfig(sampler="popularity"),
        InBatchConfig(logq="streaming", streaming_buckets=64),
        InBatchConfig(logq="none", hard_negatives=1),
        MixedConfig(num_sampled=2),
    ],
    ids=lambda c: c.kind,
)
def test_every_objective_config_builds_and_gives_a_finite_differentiable_loss(config):
    objective = build_objective(config, np.array([3, 1, 0, 2]))
    query = torch.nn.functional.normalize(torch.randn(3, 2), dim=1).requires_grad_()
    generator = torch.Generator().manual_seed(0)
    loss = objective(query, torch.tensor([0, 1, 3]), embed, torch.tensor(5.0), generator)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(query.grad).all()


@pytest.mark.parametrize(
    "make",
    [
        lambda: PointwiseConfig(num_negatives=0),
        lambda: ListwiseConfig(num_negatives=0),
        lambda: HingeConfig(alpha=-1.0),
        lambda: InBatchConfig(hard_negatives=-1),
    ],
)
def test_impossible_objective_settings_are_refused(make):
    with pytest.raises(ValueError):
        make()


def test_full_softmax_is_every_item_in_one_softmax_by_hand_with_its_gradient():
    from twotower.training.config import FullConfig
    from twotower.training.objectives import FullSoftmax

    objective = build_objective(FullConfig(), np.ones(4))
    assert isinstance(objective, FullSoftmax)
    query = torch.tensor([[1.0, 0.0], [0.6, 0.8]], requires_grad=True)
    positives = torch.tensor([2, 1])
    scale = torch.tensor(2.0)
    loss = objective(query, positives, embed, scale, torch.Generator())
    # by hand: logits_bj = 2 q_b . i_j over all four items; row loss -log p_b[pos_b];
    # d mean / d q_b = 2 (p_b - onehot(pos_b)) @ ITEMS / B
    rows, gradient = [], []
    for b in range(2):
        logits = [2 * float(query[b].detach() @ ITEMS[j]) for j in range(4)]
        p = [math.exp(x) / sum(math.exp(y) for y in logits) for x in logits]
        rows.append(-math.log(p[positives[b]]))
        delta = [p[j] - float(j == int(positives[b])) for j in range(4)]
        gradient.append(
            [sum(2 * delta[j] * float(ITEMS[j, d]) for j in range(4)) / 2 for d in (0, 1)]
        )
    assert loss.item() == pytest.approx(sum(rows) / 2, rel=1e-6)
    loss.backward()
    torch.testing.assert_close(query.grad, torch.tensor(gradient), rtol=1e-5, atol=1e-6)
    weights = torch.tensor([3.0, 1.0])
    weighted = objective(query, positives, embed, scale, torch.Generator(), weights)
    assert weighted.item() == pytest.approx((3 * rows[0] + rows[1]) / 4, rel=1e-6)


def test_full_softmax_refuses_a_corpus_above_its_limit_naming_it():
    from twotower.errors import ConfigError
    from twotower.training.config import FullConfig

    with pytest.raises(ConfigError, match="scores all 5 items at every step, more than"):
        build_objective(FullConfig(max_items=4), np.ones(5))


def test_known_pairs_answer_membership_for_every_query_and_candidate():
    from twotower.training.objectives import KnownPairs

    known = KnownPairs(torch.tensor([0, 0, 1, 2, 0]), torch.tensor([3, 1, 1, 0, 3]), num_items=4)
    table = known(torch.tensor([0, 1, 2, 3]), torch.tensor([0, 1, 2, 3]))
    assert table.tolist() == [
        [False, True, False, True],
        [False, True, False, False],
        [True, False, False, False],
        [False, False, False, False],
    ]


def test_mask_known_removes_the_querys_other_positives_from_its_softmax():
    """Rows 0 and 1 are one user who liked items 0 and 1; row 2 another user. In-batch,
    row 0's candidate column 1 (item 1, the same user's other positive) is masked, as is
    row 1's column 0; row 2 keeps both, and no row loses its own label."""
    from twotower.training.objectives import KnownPairs

    counts = np.array([1, 1, 1, 1])
    known = KnownPairs(torch.tensor([0, 0, 1]), torch.tensor([0, 1, 2]), num_items=4)
    masked = build_objective(InBatchConfig(logq="none", mask_known=True), counts, known)
    query = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]])
    positives, queries = torch.tensor([0, 1, 2]), torch.tensor([0, 0, 1])
    scale = torch.tensor(2.0)
    loss = masked(query, positives, embed, scale, torch.Generator(), queries=queries)
    allowed = [[0, 2], [1, 2], [0, 1, 2]]  # each row's unmasked candidate columns
    expected = 0.0
    for b in range(3):
        logits = {j: 2 * float(query[b] @ ITEMS[positives[j]]) for j in allowed[b]}
        expected += -logits[b] + math.log(sum(math.exp(x) for x in logits.values()))
    assert loss.item() == pytest.approx(expected / 3, rel=1e-6)
    plain = build_objective(InBatchConfig(logq="none"), counts)
    assert plain(query, positives, embed, scale, torch.Generator()).item() != pytest.approx(
        loss.item()
    )
    with pytest.raises(ValueError, match="needs each row's query"):
        masked(query, positives, embed, scale, torch.Generator())


def test_full_softmax_masks_the_querys_other_positives_by_hand():
    """Query 0 liked items 0 and 3, query 1 item 2. Row 0 (query 0, positive 0) keeps
    items 0, 1, 2 in its softmax, not 3; row 1 (query 1, positive 2) keeps all four."""
    from twotower.training.config import FullConfig
    from twotower.training.objectives import KnownPairs

    known = KnownPairs(torch.tensor([0, 0, 1]), torch.tensor([0, 3, 2]), num_items=4)
    masked = build_objective(FullConfig(mask_known=True), np.ones(4), known)
    query = torch.tensor([[1.0, 0.0], [0.6, 0.8]])
    positives, queries, scale = torch.tensor([0, 2]), torch.tensor([0, 1]), torch.tensor(2.0)
    loss = masked(query, positives, embed, scale, torch.Generator(), queries=queries)
    allowed = [[0, 1, 2], [0, 1, 2, 3]]
    expected = 0.0
    for b in range(2):
        logits = {j: 2 * float(query[b] @ ITEMS[j]) for j in allowed[b]}
        expected += -logits[int(positives[b])] + math.log(sum(map(math.exp, logits.values())))
    assert loss.item() == pytest.approx(expected / 2, rel=1e-6)
    plain = build_objective(FullConfig(), np.ones(4))(query, positives, embed, scale, None)
    assert plain.item() != pytest.approx(loss.item())
    with pytest.raises(ValueError, match="needs each row's query"):
        masked(query, positives, embed, scale, torch.Generator())


def test_known_rows_equal_the_membership_test_against_every_item():
    """``rows`` marks exactly what the pairwise test finds: repeated queries, a query
    with no pairs (5), duplicate pairs and the first and last items included."""
    from twotower.training.objectives import KnownPairs

    generator = torch.Generator().manual_seed(0)
    queries = torch.randint(0, 5, (200,), generator=generator)  # queries 0-4 only
    items = torch.randint(0, 37, (200,), generator=generator)
    known = KnownPairs(
        torch.cat([queries, torch.tensor([0, 4])]), torch.cat([items, torch.tensor([0, 36])]), 37
    )
    batch = torch.tensor([3, 0, 5, 3, 4, 1])
    rows = known.rows(batch)
    assert rows.shape == (6, 37) and rows.dtype == torch.bool
    assert torch.equal(rows, known(batch, torch.arange(37)))
    assert not rows[2].any() and rows[1, 0] and rows[4, 36]


@pytest.mark.parametrize("kind", ["mixed", "full"])
def test_mask_known_without_the_pairs_is_refused(kind):
    from twotower.errors import ConfigError
    from twotower.training.config import FullConfig

    config = MixedConfig(mask_known=True) if kind == "mixed" else FullConfig(mask_known=True)
    with pytest.raises(ConfigError, match="mask_known needs every training"):
        build_objective(config, np.ones(4))


@pytest.mark.parametrize("compete", [False, True])
def test_held_out_positives_compete_only_when_asked(compete):
    """Query 0 trained on items 0, 1 and 2; this epoch 0 and 1 are held out (positives)
    and 2 is its input. With ``positives_compete`` each positive's softmax runs over
    itself, the other positive and the unknown item 3; without, over itself and item 3.
    The loss is the mean of the two terms, by hand, and so is its gradient."""
    from twotower.training.config import FullConfig
    from twotower.training.objectives import KnownPairs

    known = KnownPairs(torch.tensor([0, 0, 0]), torch.tensor([0, 1, 2]), num_items=4)
    config = FullConfig(mask_known=True, positives_compete=compete)
    objective = build_objective(config, np.ones(4), known)
    query = torch.tensor([[1.0, 0.0]], requires_grad=True)
    items = torch.tensor([[0.6, 0.8], [1.0, 0.0], [0.0, 1.0], [-0.8, 0.6]])
    positives, owners = torch.tensor([0, 1]), torch.tensor([0, 0])
    scale = torch.tensor(5.0)
    loss = objective.sets(
        query, positives, owners, lambda i: items[i], scale, queries=torch.tensor([0])
    )
    s = (query @ items.T * scale)[0]  # 3, 5, 0, -4
    if compete:
        terms = [torch.logsumexp(s[[0, 1, 3]], 0) - s[p] for p in (0, 1)]
    else:
        terms = [torch.logsumexp(s[[p, 3]], 0) - s[p] for p in (0, 1)]
    expected = (terms[0] + terms[1]) / 2
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    (grad,) = torch.autograd.grad(loss, query)
    (want,) = torch.autograd.grad(expected, query)
    torch.testing.assert_close(grad, want)


def test_positives_compete_without_mask_known_is_refused():
    from twotower.training.config import FullConfig

    with pytest.raises(ValueError, match="positives_compete changes what mask_known"):
        FullConfig(positives_compete=True)


def test_full_softmax_leaves_each_rows_seen_items_out_but_never_its_positive():
    """Row 0 (positive 0) has seen items 1 and 0 (its own positive: kept); row 1
    (positive 3) has seen item 2. Row 0's softmax runs over items 0, 2, 3, row 1's over
    0, 1, 3; the loss is the mean of the two terms, by hand, and so is its gradient."""
    from twotower.training.config import FullConfig

    objective = build_objective(FullConfig(), np.ones(4))
    query = torch.tensor([[1.0, 0.0], [0.6, 0.8]], requires_grad=True)
    positives, scale = torch.tensor([0, 3]), torch.tensor(2.0)
    seen = (torch.tensor([0, 0, 1]), torch.tensor([1, 0, 2]))
    loss = objective(query, positives, embed, scale, None, seen=seen)
    s = query @ ITEMS.T * scale  # (2, 4)
    expected = (
        torch.logsumexp(s[0, [0, 2, 3]], 0)
        - s[0, 0]
        + torch.logsumexp(s[1, [0, 1, 3]], 0)
        - s[1, 3]
    ) / 2
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    (grad,) = torch.autograd.grad(loss, query)
    (want,) = torch.autograd.grad(expected, query)
    torch.testing.assert_close(grad, want)


def random_full_case(seed: int) -> dict:
    """Seven query rows, 11 items, positives with owners out of order, weights, known
    pairs and seen items: every input a chunk boundary could cut wrongly."""
    from twotower.training.objectives import KnownPairs

    g = torch.Generator().manual_seed(seed)
    items = torch.nn.functional.normalize(torch.randn(11, 3, generator=g), dim=1)
    return {
        "query": torch.nn.functional.normalize(torch.randn(7, 3, generator=g), dim=1),
        "items": items.requires_grad_(),
        "positives": torch.randint(0, 11, (12,), generator=g),
        "owners": torch.tensor([3, 0, 6, 6, 1, 2, 0, 5, 4, 3, 6, 1]),
        "weights": torch.rand(12, generator=g),
        "queries": torch.tensor([0, 1, 2, 0, 3, 1, 4]),
        "known": KnownPairs(
            torch.randint(0, 5, (20,), generator=g), torch.randint(0, 11, (20,), generator=g), 11
        ),
        "seen": (torch.randint(0, 7, (15,), generator=g), torch.randint(0, 11, (15,), generator=g)),
    }


@pytest.mark.parametrize("masking", ["none", "known", "compete", "seen"])
@pytest.mark.parametrize("chunk_rows", [1, 3, 7, 50])
def test_chunked_full_softmax_equals_all_rows_at_once_with_its_gradient(masking, chunk_rows):
    from twotower.training.objectives import FullSoftmax

    case = random_full_case(0)
    known = case["known"] if masking in ("known", "compete") else None
    seen = case["seen"] if masking == "seen" else None
    results = []
    for chunk in (None, chunk_rows):
        objective = FullSoftmax(11, known, masking == "compete", chunk)
        query = case["query"].clone().requires_grad_()
        scale = torch.tensor(3.0, requires_grad=True)
        loss = objective.sets(
            query,
            case["positives"],
            case["owners"],
            lambda i: case["items"][i] * 1.0,
            scale,
            case["weights"],
            case["queries"],
            seen,
        )
        results.append((loss, *torch.autograd.grad(loss, [query, case["items"], scale])))
    for whole, chunked in zip(*results, strict=True):
        torch.testing.assert_close(chunked, whole, rtol=1e-5, atol=1e-6)


def test_full_softmax_options_that_contradict_each_other_are_refused():
    from twotower.training.config import FullConfig

    with pytest.raises(ValueError, match="mask_known already leaves out every training item"):
        FullConfig(mask_known=True, mask_seen=True)
    with pytest.raises(ValueError, match="chunk_rows must be >= 1"):
        FullConfig(chunk_rows=0)
