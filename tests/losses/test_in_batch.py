import math

import pytest
import torch

from twotower.losses import SampledSoftmax, mask_accidental_hits

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
