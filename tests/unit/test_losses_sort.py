"""CTC loss, decoding and accuracy of the sort task against the reference's (golden fixture)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ctm_dist.losses import decode_sort, sort_loss, sort_position_accuracy, sort_sequence_accuracy

CTC = Path(__file__).resolve().parents[1] / "golden" / "sort" / "ctc_loss_and_decoding.safetensors"


def test_loss_and_decoding_match_the_reference():
    case = load_file(str(CTC))
    logits, targets = case["logits"], case["targets"]
    torch.testing.assert_close(sort_loss(logits, targets), case["loss"][0], atol=1e-5, rtol=1e-5)
    decoded = decode_sort(logits)
    assert torch.equal(decoded, case["decoded"])
    # the fixture holds right, partly right and wrong orders
    per_sample = (decoded == targets).float().mean(1)
    assert 0 < (per_sample == 1).sum() < len(per_sample) and (per_sample < 0.5).any()
    torch.testing.assert_close(sort_position_accuracy(logits, targets), per_sample.mean())
    torch.testing.assert_close(
        sort_sequence_accuracy(logits, targets), (per_sample == 1).float().mean()
    )


def _one_hot_ticks(sequence: list[int], classes: int) -> torch.Tensor:
    logits = torch.full((1, classes, len(sequence)), -5.0)
    for t, c in enumerate(sequence):
        logits[0, c, t] = 5.0
    return logits


def test_decoding_drops_blanks_repeats_and_a_class_equal_to_the_last_emitted():
    blank = 4
    logits = _one_hot_ticks([2, 2, blank, 0, blank, 0, 3, 1, 1, 2], classes=5)
    # 0 after a blank is dropped as in the reference (the last emitted class is still 0)
    assert decode_sort(logits).tolist() == [[2, 0, 3, 1]]
    assert decode_sort(_one_hot_ticks([blank, 1, blank], 5)).tolist() == [[1, 4, 4, 4]]


def test_weights_drop_padding_and_sum_reduces_over_valid_samples():
    torch.manual_seed(0)
    logits = torch.randn(4, 6, 8, requires_grad=True)
    targets = torch.stack([torch.randperm(5) for _ in range(4)])
    valid = torch.tensor([1.0, 1.0, 1.0, 0.0])
    want = sort_loss(logits[:3], targets[:3])
    torch.testing.assert_close(sort_loss(logits, targets, weight=valid), want)
    torch.testing.assert_close(
        sort_loss(logits, targets, weight=valid, reduction="sum"), want * 3, rtol=1e-5, atol=1e-6
    )
    sort_loss(logits, targets, weight=valid).backward()
    assert logits.grad[3].abs().sum() == 0 and logits.grad[:3].abs().sum() > 0
    assert sort_position_accuracy(logits, targets, weight=valid, reduction="none")[3] == 0


def test_bad_shapes_and_too_few_ticks_say_why():
    with pytest.raises(ValueError, match="needs 6 \\(one per position and a blank\\)"):
        sort_loss(torch.randn(2, 5, 8), torch.zeros(2, 5, dtype=torch.long))
    with pytest.raises(ValueError, match="4 ticks cannot emit 5 values"):
        sort_loss(torch.randn(2, 6, 4), torch.zeros(2, 5, dtype=torch.long))
    with pytest.raises(ValueError, match="expected predictions"):
        sort_position_accuracy(torch.randn(2, 6), torch.zeros(2, 5, dtype=torch.long))
