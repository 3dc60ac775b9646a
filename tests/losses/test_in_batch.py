import math

import pytest
import torch

from twotower.losses import MultiPositiveSoftmax, SampledSoftmax, mask_accidental_hits

INF = float("inf")
# B = 2 queries, M = 3 shared candidates, labels [0, 1]:
#   logits = [[ln 2, 0, 0   ],
#             [0, ln 3, -inf]]
# row 0: softmax = [2, 1, 1] / 4 -> -log(1/2) = ln 2; row 1: [1, 3, 0] / 4 -> ln(4/3)
LOGITS = [[math.log(2), 0.0, 0.0], [0.0, math.log(3), -INF]]
LABELS = torch.tensor([0, 1])


def _logits() -> torch.Tensor:
    return torch.tensor(LOGITS, dtype=torch.float64, requires_grad=True)


def test_hand_computed_value():
    expected = (math.log(2) + math.log(4 / 3)) / 2
    assert SampledSoftmax()(_logits(), LABELS).item() == pytest.approx(expected, abs=1e-12)


def test_gradient_raises_the_label_column_and_lowers_the_rest():
    logits = _logits()
    SampledSoftmax()(logits, LABELS).backward()
    # (softmax - one_hot) / B
    assert logits.grad[0].tolist() == pytest.approx([-1 / 4, 1 / 8, 1 / 8], abs=1e-12)
    assert logits.grad[1].tolist() == pytest.approx([1 / 8, -1 / 8, 0.0], abs=1e-12)


def test_a_minus_inf_entry_equals_removing_the_column():
    logits = _logits()
    with_masked = SampledSoftmax()(logits[1:], torch.tensor([1]))  # [[0, ln 3, -inf]]
    without = SampledSoftmax()(logits[1:, :2], torch.tensor([1]))  # [[0, ln 3]]
    assert with_masked.item() == without.item() == pytest.approx(math.log(4 / 3), abs=1e-12)


def test_in_batch_duplicate_is_not_a_negative_after_masking():
    # Items [7, 3, 7]: row 0's positive 7 also sits in column 2. With every logit 0, the
    # masked row is softmax over 2 columns (ln 2) instead of 3 (ln 3).
    item_ids = torch.tensor([7, 3, 7])
    labels = torch.arange(3)
    logits = mask_accidental_hits(torch.zeros(3, 3), labels, item_ids, item_ids)
    loss = SampledSoftmax()(logits, labels)
    assert loss.item() == pytest.approx((math.log(2) + math.log(3) + math.log(2)) / 3)


def test_rejects_bad_labels():
    with pytest.raises(ValueError, match=r"labels must be int64 of shape \(2,\)"):
        SampledSoftmax()(torch.zeros(2, 3), torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="labels must be int64"):
        SampledSoftmax()(torch.zeros(2, 3), torch.tensor([0, 1], dtype=torch.int32))
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 3\)"):
        SampledSoftmax()(torch.zeros(2, 3), torch.tensor([0, 3]))
    with pytest.raises(ValueError, match=r"logits must be \(B, M\)"):
        SampledSoftmax()(torch.zeros(3), torch.tensor([0, 1, 2]))


# MultiPositiveSoftmax: one row, M = 3, logits [ln 2, 0, 0], positives in columns 0 and 1.
#   plain:    term_0 = ln(4 / 2) = ln 2,  term_1 = ln(4 / 1) = ln 4
#   column 1 excluded for the positive in column 0 and column 0 for the one in 1 (each
#   query's other positive masked): term_0 = ln((2 + 1) / 2), term_1 = ln((1 + 1) / 1)
def test_multi_positive_hand_computed_values():
    logits = torch.tensor([[math.log(2), 0.0, 0.0]], dtype=torch.float64)
    labels, owners = torch.tensor([0, 1]), torch.tensor([0, 0])
    plain = MultiPositiveSoftmax()(logits, labels, owners)
    assert plain.item() == pytest.approx((math.log(2) + math.log(4)) / 2, abs=1e-12)
    exclude = torch.tensor([[True, True, False]])  # the row's positives
    masked = MultiPositiveSoftmax()(logits, labels, owners, exclude)
    assert masked.item() == pytest.approx((math.log(3 / 2) + math.log(2)) / 2, abs=1e-12)
    weighted = MultiPositiveSoftmax()(logits, labels, owners, exclude, torch.tensor([3.0, 1.0]))
    expected = (3 * math.log(3 / 2) + math.log(2)) / 4
    assert weighted.item() == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("weighted", [False, True])
def test_multi_positive_equals_one_row_per_positive(masked, weighted):
    """The oracle: SampledSoftmax on each positive's row repeated, its excluded columns
    (but its own) set to -inf; value and gradient."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 9, generator=g, dtype=torch.float64)
    owners = torch.tensor([0, 0, 0, 2, 3, 3])
    labels = torch.tensor([1, 4, 8, 0, 2, 7])
    exclude = torch.rand(4, 9, generator=g) < 0.3 if masked else None
    if masked:
        exclude[owners, labels] = torch.tensor([True, False, True, True, False, True])
    weights = torch.rand(6, generator=g, dtype=torch.float64) if weighted else None
    ours = logits.clone().requires_grad_(True)
    got = MultiPositiveSoftmax()(ours, labels, owners, exclude, weights)
    got.backward()
    theirs = logits.clone().requires_grad_(True)
    rows = theirs[owners]
    if masked:
        own = torch.zeros_like(exclude[owners]).scatter_(1, labels[:, None], True)
        rows = rows.masked_fill(exclude[owners] & ~own, -INF)
    expected = SampledSoftmax()(rows, labels, weights)
    expected.backward()
    assert got.item() == pytest.approx(expected.item(), abs=1e-12)
    torch.testing.assert_close(ours.grad, theirs.grad, rtol=0, atol=1e-12)


def test_multi_positive_without_positives_is_zero_and_attached():
    logits = torch.randn(2, 3, requires_grad=True)
    loss = MultiPositiveSoftmax()(
        logits, torch.zeros(0, dtype=torch.int64), torch.zeros(0, dtype=torch.int64)
    )
    loss.backward()
    assert loss.item() == 0.0 and torch.equal(logits.grad, torch.zeros(2, 3))


def test_multi_positive_names_bad_shapes():
    logits = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="one shape"):
        MultiPositiveSoftmax()(logits, torch.tensor([0, 1]), torch.tensor([0]))
    with pytest.raises(ValueError, match=r"labels must be int64 in \[0, 3\)"):
        MultiPositiveSoftmax()(logits, torch.tensor([3]), torch.tensor([0]))
    with pytest.raises(ValueError, match="exclude must be a bool tensor of shape"):
        MultiPositiveSoftmax()(logits, torch.tensor([1]), torch.tensor([0]), torch.zeros(2, 3))
