"""One contract for every history encoder: shapes, padding invariance, holes, empty
histories, causality, determinism; and attention pooling and a transformer block
against values computed by hand on tiny inputs."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from twotower.features.specs import HistoryFeature
from twotower.towers.encoders import PooledEncoder, embedding_table
from twotower.towers.history import (
    HISTORY_ENCODERS,
    AttentionPooling,
    CausalTransformer,
    HistoryEncoder,
    SequenceEncoder,
)
from twotower.towers.history.order import oldest_first

ENCODERS = ["mean", "sum", *HISTORY_ENCODERS]
SEQUENCES = ["transformer", "gru"]
D = 8


def make(name: str, max_len: int = 6, **spec) -> nn.Module:
    torch.manual_seed(0)
    table = embedding_table(30, D, sparse=False)
    if name in ("mean", "sum"):
        return PooledEncoder(table, name).eval()
    options = {"heads": 2, "dropout": 0.0, **spec}
    feature = HistoryFeature("history", "user", "item_id", max_len=max_len, encoder=name, **options)
    return HISTORY_ENCODERS[name](table, feature).eval()


HISTORIES = torch.tensor([[5, 3, 2, 0, 0, 0], [7, 0, 0, 0, 0, 0], [4, 11, 9, 1, 6, 8]])


@pytest.mark.parametrize("name", ENCODERS)
def test_every_encoder_declares_the_history_encoder_interface(name):
    """What a tower reads of an encoder is declared, not probed: one vector of the
    table's width, no timestamps; a per-position output for the sequence encoders."""
    encoder = make(name)
    assert isinstance(encoder, HistoryEncoder)
    assert (encoder.width, encoder.interests, encoder.times_input) == (D, 1, None)
    assert isinstance(encoder, SequenceEncoder) == (name in SEQUENCES)


def test_attention_with_time_gaps_declares_the_timestamps_it_reads():
    encoder = timed()
    assert isinstance(encoder, HistoryEncoder) and not isinstance(encoder, SequenceEncoder)
    assert encoder.times_input == "history:times"


@pytest.mark.parametrize("name", ENCODERS)
def test_one_vector_of_the_table_width_per_history(name):
    assert make(name)(HISTORIES).shape == (3, D)


@pytest.mark.parametrize("name", ENCODERS)
def test_the_same_history_padded_to_any_length_gives_the_same_vector(name):
    encoder = make(name)
    expected = encoder(HISTORIES)
    for extra in (1, 5, 20):
        padded = torch.cat([HISTORIES, torch.zeros(3, extra, dtype=torch.long)], dim=1)
        torch.testing.assert_close(encoder(padded), expected, rtol=0, atol=1e-6)
    shorter = HISTORIES[:2, :3]  # the first two rows' padding cut off
    torch.testing.assert_close(encoder(shorter), expected[:2], rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", ENCODERS)
def test_a_blanked_item_is_as_if_it_never_was(name):
    """``mask_target`` blanks the target wherever it stands in a history."""
    encoder = make(name)
    holes = torch.tensor([[5, 0, 3, 2, 0, 0], [0, 7, 0, 0, 0, 0]])
    compact = torch.tensor([[5, 3, 2, 0, 0, 0], [7, 0, 0, 0, 0, 0]])
    torch.testing.assert_close(encoder(holes), encoder(compact), rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", ENCODERS)
def test_an_empty_history_is_zero_with_finite_gradients(name):
    encoder = make(name).train()
    out = encoder(torch.tensor([[0, 0, 0, 0, 0, 0], [4, 2, 0, 0, 0, 0]]))
    assert torch.equal(out[0], torch.zeros(D))
    out.sum().backward()
    grads = [p.grad for p in encoder.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("name", ENCODERS)
def test_deterministic_in_eval_mode_and_given_the_seed_in_training(name):
    encoder = make(name, dropout=0.3) if name in HISTORY_ENCODERS else make(name)
    torch.testing.assert_close(encoder(HISTORIES), encoder(HISTORIES), rtol=0, atol=0)
    encoder.train()
    torch.manual_seed(1)
    first = encoder(HISTORIES)
    torch.manual_seed(1)
    torch.testing.assert_close(encoder(HISTORIES), first, rtol=0, atol=0)


@pytest.mark.parametrize("name", SEQUENCES)
def test_a_position_never_sees_a_later_item(name):
    """The gradient of position t's output with respect to every later item is zero."""
    encoder = make(name)
    codes, lengths = oldest_first(HISTORIES)
    L = codes.shape[1]
    weights = torch.randn(D)  # not a plain sum: a layer norm's outputs sum to a constant
    for t in range(L):
        items = encoder.table(codes).detach().requires_grad_(True)  # (B, L, D)
        (encoder.sequence(items, lengths)[:, t] @ weights).sum().backward()
        assert torch.count_nonzero(items.grad[:, t + 1 :]) == 0, t
        assert torch.count_nonzero(items.grad[2, : t + 1]) > 0, t  # the full row sees them


@pytest.mark.parametrize("name", SEQUENCES)
def test_each_position_encodes_its_prefix_as_a_history_of_that_length(name):
    """Position t of one pass equals the encoder's vector of the history up to t."""
    encoder = make(name)
    codes, lengths = oldest_first(HISTORIES[2:])  # six items, oldest first
    every = encoder.sequence(encoder.table(codes), lengths)[0]  # (L, D)
    for t in range(6):
        prefix = codes[:, : t + 1].flip(1)  # most recent first
        torch.testing.assert_close(encoder(prefix)[0], every[t], rtol=0, atol=1e-6)


def test_attention_pooling_by_hand():
    """D = 2, two items: keys e + p, scores v . tanh(W k + b), weights softmax."""
    table = nn.Embedding(4, 2)
    feature = HistoryFeature("h", "u", "i", max_len=3, encoder="attention")
    pooling = AttentionPooling(table, feature)
    with torch.no_grad():
        table.weight.copy_(torch.tensor([[0.0, 0.0], [0.0, 0.0], [1.0, 0.0], [0.0, 2.0]]))
        pooling.recency.weight.copy_(torch.tensor([[0.5, 0.0], [0.0, 0.0], [0.0, 0.0]]))
        pooling.project.weight.copy_(torch.eye(2))
        pooling.project.bias.zero_()
        pooling.score.weight.copy_(torch.tensor([[1.0, 1.0]]))
    # most recent item 2: k = (1.5, 0), a = tanh(1.5); then item 3: k = (0, 2), a = tanh(2)
    a, b = math.tanh(1.5), math.tanh(2.0)
    w = math.exp(a) / (math.exp(a) + math.exp(b))
    expected = torch.tensor([[w * 1.0, (1 - w) * 2.0]])
    out = pooling(torch.tensor([[2, 3, 0]]))
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-6)


def test_one_transformer_block_by_hand():
    """One block, one head, D = 2, on the history [item 2 (older), item 3]: the most
    recent position's output, written out step by step."""
    torch.manual_seed(0)
    table = nn.Embedding(4, 2)
    feature = HistoryFeature("h", "u", "i", max_len=3, encoder="transformer", layers=1)
    model = CausalTransformer(table, feature).eval()
    block = model.blocks[0]
    x = torch.tensor([[3, 2, 0]])  # most recent first
    e = table.weight[torch.tensor([2, 3])] + model.position.weight[:2]  # oldest first (2, D)

    def norm(v, layer):
        mean, var = v.mean(-1, keepdim=True), v.var(-1, unbiased=False, keepdim=True)
        return (v - mean) / torch.sqrt(var + layer.eps) * layer.weight + layer.bias

    wq, wk, wv = block.attention.in_proj_weight.chunk(3)
    bq, bk, bv = block.attention.in_proj_bias.chunk(3)
    a = norm(e, block.attention_norm)
    q, k, v = a @ wq.T + bq, a @ wk.T + bk, a @ wv.T + bv
    scores = q[1] @ k.T / math.sqrt(2)  # the last position sees both
    attended = torch.softmax(scores, 0) @ v
    h = e[1] + attended @ block.attention.out_proj.weight.T + block.attention.out_proj.bias
    first, _, second = block.ffn[0], block.ffn[1], block.ffn[3]
    h = h + second(torch.relu(first(norm(h, block.ffn_norm))))
    expected = norm(h, model.norm)
    torch.testing.assert_close(model(x)[0], expected, rtol=0, atol=1e-5)


def timed(max_len: int = 6, buckets: int = 4) -> AttentionPooling:
    torch.manual_seed(0)
    feature = HistoryFeature(
        "history", "user", "item_id", max_len=max_len, encoder="attention", time_buckets=buckets
    )
    return AttentionPooling(embedding_table(30, D, sparse=False), feature).eval()


HOUR = 3600.0
TIMES = (
    torch.tensor(
        [[9, 8, 1, 0, 0, 0], [5, 0, 0, 0, 0, 0], [60, 59, 50, 40, 20, 1]], dtype=torch.float64
    )
    * HOUR
)


def test_attention_with_time_gaps_by_hand():
    """Two items 3 hours apart: gaps 0 and 3 hours, buckets floor(log2(1 + gap)) = 0, 2."""
    table = nn.Embedding(4, 2)
    feature = HistoryFeature("h", "u", "i", max_len=3, encoder="attention", time_buckets=3)
    pooling = AttentionPooling(table, feature)
    with torch.no_grad():
        table.weight.copy_(torch.tensor([[0.0, 0.0], [0.0, 0.0], [1.0, 0.0], [0.0, 2.0]]))
        pooling.recency.weight.zero_()
        pooling.gaps.weight.copy_(torch.tensor([[0.5, 0.0], [9.0, 9.0], [0.0, -1.0]]))
        pooling.project.weight.copy_(torch.eye(2))
        pooling.project.bias.zero_()
        pooling.score.weight.copy_(torch.tensor([[1.0, 1.0]]))
    # item 2 (latest): k = (1, 0) + (0.5, 0), a = tanh(1.5); item 3: k = (0, 2) + (0, -1)
    a, b = math.tanh(1.5), math.tanh(1.0)
    w = math.exp(a) / (math.exp(a) + math.exp(b))
    times = torch.tensor([[10 * HOUR, 7 * HOUR, 0.0]], dtype=torch.float64)
    out = pooling(torch.tensor([[2, 3, 0]]), times)
    torch.testing.assert_close(out, torch.tensor([[w * 1.0, (1 - w) * 2.0]]), rtol=0, atol=1e-6)
    # gaps past the last bucket share it: 1,000 hours is bucket 2 as well
    far = torch.tensor([[10 * HOUR, -990 * HOUR, 0.0]], dtype=torch.float64)
    torch.testing.assert_close(pooling(torch.tensor([[2, 3, 0]]), far), out, rtol=0, atol=1e-6)


def test_time_gaps_are_to_the_latest_item_and_ignore_padding_and_holes():
    pooling = timed()
    expected = pooling(HISTORIES, TIMES)
    later = TIMES + 1e6 * HOUR  # the same spacing, any time
    torch.testing.assert_close(pooling(HISTORIES, later), expected, rtol=0, atol=1e-6)
    padded = torch.cat([HISTORIES, torch.zeros(3, 4, dtype=torch.long)], dim=1)
    padded_times = torch.cat([TIMES, torch.full((3, 4), 7.0, dtype=torch.float64)], dim=1)
    torch.testing.assert_close(pooling(padded, padded_times), expected, rtol=0, atol=1e-6)
    holes = torch.tensor([[5, 0, 3, 2, 0, 0]])  # a blanked target; its time is never read
    hole_times = torch.tensor([[9, 123, 8, 1, 0, 0]], dtype=torch.float64) * HOUR
    torch.testing.assert_close(pooling(holes, hole_times), expected[:1], rtol=0, atol=1e-6)
    spread = TIMES.clone()
    spread[0, 1] = 2 * HOUR  # the second item now 7 hours before the first, not 1
    assert not torch.allclose(pooling(HISTORIES, spread)[0], expected[0])
    with pytest.raises(ValueError, match="needs 'history:times'"):
        pooling(HISTORIES)
