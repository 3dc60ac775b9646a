import math

import pytest
import torch

from twotower.losses import (
    SampledSoftmax,
    hardest_negatives,
    logq_correction,
    mask_accidental_hits,
    negative_mask,
)

INF = float("inf")
LN2, LN4 = math.log(2), math.log(4)


def test_logq_subtracts_each_columns_log_probability():
    logits = torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.0, -INF]], dtype=torch.float64)
    before = logits.clone()
    log_q = torch.tensor([0.5, 0.25, 0.25], dtype=torch.float64).log()
    corrected = logq_correction(logits, log_q)
    # -log 0.5 = ln 2, -log 0.25 = ln 4; -inf stays -inf.
    assert corrected[0].tolist() == pytest.approx([1 + LN2, 2 + LN4, 3 + LN4], abs=1e-12)
    assert corrected[1, :2].tolist() == pytest.approx([LN2, LN4], abs=1e-12)
    assert corrected[1, 2].item() == -INF
    assert torch.equal(logits, before)


def test_logq_charges_popular_positives_more_and_rare_ones_less():
    # One query scoring 3 candidates equally, q = [0.5, 0.25, 0.25]. Corrected logits
    # [ln 2, ln 4, ln 4] -> softmax [2, 4, 4] / 10. Uncorrected, every column costs ln 3.
    logits = torch.zeros(1, 3, dtype=torch.float64)
    log_q = torch.tensor([0.5, 0.25, 0.25], dtype=torch.float64).log()
    corrected = logq_correction(logits, log_q)
    popular = SampledSoftmax()(corrected, torch.tensor([0]))
    rare = SampledSoftmax()(corrected, torch.tensor([1]))
    assert SampledSoftmax()(logits, torch.tensor([0])).item() == pytest.approx(math.log(3))
    assert popular.item() == pytest.approx(math.log(10 / 2), abs=1e-12)
    assert rare.item() == pytest.approx(math.log(10 / 4), abs=1e-12)


def test_logq_rejects_a_wrong_length():
    with pytest.raises(ValueError, match=r"log_q must be \(M,\) with M=3, got \(2,\)"):
        logq_correction(torch.zeros(2, 3), torch.zeros(2))


# Mixed negatives: the 4 in-batch positives [7, 3, 7, 5] are columns 0-3 (labels 0-3);
# sampled corpus items [9, 3] are columns 4-5. Item 7 appears twice in the batch.
POSITIVE_IDS = torch.tensor([7, 3, 7, 5])
CANDIDATE_IDS = torch.tensor([7, 3, 7, 5, 9, 3])
LABELS = torch.arange(4)


def test_accidental_hits_are_exactly_the_duplicates_of_each_rows_positive():
    logits = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    before = logits.clone()
    masked = mask_accidental_hits(logits, LABELS, POSITIVE_IDS, CANDIDATE_IDS)
    # Row 0 (item 7, label 0): column 2 is item 7 too. Row 2 (item 7, label 2): column 0.
    # Row 1 (item 3, label 1): sampled column 5 is item 3. Row 3 (item 5): nothing.
    expected = {(0, 2), (2, 0), (1, 5)}
    assert set(map(tuple, torch.isinf(masked).nonzero().tolist())) == expected
    assert (masked[masked.isfinite()] == logits[masked.isfinite()]).all()
    assert masked[torch.arange(4), LABELS].isfinite().all()
    assert torch.equal(logits, before)


def test_accidental_hits_never_mask_the_label_column_when_labels_are_not_diagonal():
    # Both rows' positive is item 7, at column 1 for row 0 and column 0 for row 1.
    logits = torch.zeros(2, 3)
    masked = mask_accidental_hits(
        logits, torch.tensor([1, 0]), torch.tensor([7, 7]), torch.tensor([7, 7, 4])
    )
    assert torch.isinf(masked).tolist() == [[True, False, False], [False, True, False]]


def test_accidental_hits_reject_mismatched_ids():
    with pytest.raises(ValueError, match=r"candidate_ids must be \(M,\) with M=6"):
        mask_accidental_hits(torch.zeros(4, 6), LABELS, POSITIVE_IDS, CANDIDATE_IDS[:5])
    with pytest.raises(ValueError, match=r"positive_ids must be \(B,\) with B=4"):
        mask_accidental_hits(torch.zeros(4, 6), LABELS, POSITIVE_IDS[:3], CANDIDATE_IDS)


# 3 x 5 logits; labels [0, 2, 4] mark the positives 5, 8 and 0.
HARD_LOGITS = [
    [5.0, 1.0, 4.0, 2.0, 3.0],  # negatives 1, 4, 2, 3 -> hardest two: 4, 3
    [0.0, 9.0, 8.0, 7.0, 6.0],  # negatives 0, 9, 7, 6 -> 9, 7 (one beats the positive)
    [1.0, 2.0, 3.0, 4.0, 0.0],  # negatives 1, 2, 3, 4 -> 4, 3
]
HARD_LABELS = torch.tensor([0, 2, 4])


def test_hardest_negatives_hand_made():
    logits = torch.tensor(HARD_LOGITS)
    kept, labels = hardest_negatives(logits, HARD_LABELS, num=2)
    assert kept.tolist() == [[5.0, 4.0, 3.0], [8.0, 9.0, 7.0], [0.0, 4.0, 3.0]]
    assert labels.tolist() == [0, 0, 0]
    assert labels.dtype == torch.int64
    assert logits.tolist() == HARD_LOGITS


@pytest.mark.parametrize("num", [4, 10])
def test_hardest_negatives_keeps_all_when_num_is_large(num):
    kept, _ = hardest_negatives(torch.tensor(HARD_LOGITS), HARD_LABELS, num=num)
    expected = [[5.0, 4.0, 3.0, 2.0, 1.0], [8.0, 9.0, 7.0, 6.0, 0.0], [0.0, 4.0, 3.0, 2.0, 1.0]]
    assert kept.tolist() == expected


def test_hardest_negatives_gradient_reaches_only_the_kept_entries():
    logits = torch.tensor(HARD_LOGITS, requires_grad=True)
    kept, _ = hardest_negatives(logits, HARD_LABELS, num=2)
    kept.sum().backward()
    expected = [[1, 0, 1, 0, 1], [0, 1, 1, 1, 0], [0, 0, 1, 1, 1]]
    assert logits.grad.tolist() == expected


def test_hardest_negatives_matches_a_row_by_row_oracle():
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(16, 9, generator=generator)
    labels = torch.randint(0, 9, (16,), generator=generator)
    kept, _ = hardest_negatives(logits, labels, num=3)
    for b in range(16):
        row = logits[b].tolist()
        positive = row.pop(int(labels[b]))
        assert kept[b].tolist() == [positive] + sorted(row, reverse=True)[:3]


def test_hardest_negatives_may_keep_masked_entries_and_rejects_bad_num():
    logits = torch.tensor([[2.0, 1.0, -INF, -INF]])
    kept, _ = hardest_negatives(logits, torch.tensor([0]), num=2)
    assert kept.tolist() == [[2.0, 1.0, -INF]]
    with pytest.raises(ValueError, match="num must be >= 1"):
        hardest_negatives(logits, torch.tensor([0]), num=0)


def test_negative_mask_drops_draws_equal_to_the_positive():
    mask = negative_mask(torch.tensor([7, 3]), torch.tensor([[7, 1, 7], [2, 3, 4]]))
    assert mask.dtype == torch.bool
    assert mask.tolist() == [[False, True, False], [True, False, True]]
    with pytest.raises(ValueError, match=r"negative_ids must be \(B, n\) with B=2, got \(3,\)"):
        negative_mask(torch.tensor([7, 3]), torch.tensor([1, 2, 3]))
