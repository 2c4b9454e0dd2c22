"""Accuracy metrics on small tensors whose answers are counted by hand."""
import pytest
import torch

from ctm_dist.losses import (
    accuracy_at_most_certain,
    maze_route_accuracy,
    maze_step_accuracy,
    parity_position_accuracy,
    per_tick_accuracy,
    predictions_at_tick,
    topk_accuracy,
)


def _one_hot_logits(classes_per_tick, num_classes):
    """classes_per_tick[b][t] = predicted class -> logits [B, C, T]."""
    B, T = len(classes_per_tick), len(classes_per_tick[0])
    logits = torch.zeros(B, num_classes, T)
    for b in range(B):
        for t in range(T):
            logits[b, classes_per_tick[b][t], t] = 1.0
    return logits


def test_accuracy_at_chosen_tick_and_per_tick():
    # 4 samples, 3 ticks, predicted classes per tick:
    preds = _one_hot_logits([[0, 1, 1], [2, 2, 0], [1, 1, 1], [0, 3, 3]], 4)
    targets = torch.tensor([1, 2, 0, 3])
    tick = torch.tensor([2, 0, 1, 0])
    # at chosen ticks: sample0 -> 1 (right), sample1 -> 2 (right), sample2 -> 1 (wrong), sample3 -> 0 (wrong)
    assert accuracy_at_most_certain(preds, targets, tick).item() == pytest.approx(0.5)
    assert accuracy_at_most_certain(preds, targets, tick, reduction="none").tolist() == [1, 1, 0, 0]
    assert accuracy_at_most_certain(preds, targets, tick, reduction="sum").item() == 2
    # tick 0: right for sample1 only; tick 1: samples 0,1,3; tick 2: samples 0,3
    assert per_tick_accuracy(preds, targets).tolist() == pytest.approx([0.25, 0.75, 0.5])
    assert per_tick_accuracy(preds, targets, reduction="sum").tolist() == [1, 3, 2]
    # Masking out sample 3 (padding): tick 1 -> 2/3, tick 2 -> 1/3
    weight = torch.tensor([1, 1, 1, 0])
    assert per_tick_accuracy(preds, targets, weight=weight).tolist() == pytest.approx([1 / 3, 2 / 3, 1 / 3])
    assert accuracy_at_most_certain(preds, targets, tick, weight=weight).item() == pytest.approx(2 / 3)


def test_predictions_at_tick_picks_per_sample_slices():
    preds = torch.arange(2 * 3 * 4, dtype=torch.float).reshape(2, 3, 4)
    picked = predictions_at_tick(preds, torch.tensor([3, 1]))
    assert picked.tolist() == [preds[0, :, 3].tolist(), preds[1, :, 1].tolist()]


def test_topk_accuracy():
    # one tick; logits ranked so that the target sits at a known rank
    logits = torch.tensor([
        [9.0, 8, 7, 6, 5, 4, 3],  # target 4 is 5th -> top-5 hit, top-1 miss
        [9.0, 8, 7, 6, 5, 4, 3],  # target 5 is 6th -> miss
        [1.0, 2, 3, 4, 5, 6, 7],  # target 6 is 1st -> hit
    ]).unsqueeze(-1)
    targets = torch.tensor([4, 5, 6])
    tick = torch.zeros(3, dtype=torch.long)
    assert topk_accuracy(logits, targets, tick, k=5, reduction="none").tolist() == [1, 0, 1]
    assert topk_accuracy(logits, targets, tick, k=1).item() == pytest.approx(1 / 3)
    assert topk_accuracy(logits, targets, tick, k=6).item() == 1.0
    # k larger than the number of classes means every sample hits
    assert topk_accuracy(logits[:, :3], torch.tensor([0, 1, 2]), tick, k=5).item() == 1.0


def _sequence_logits(classes, num_classes):
    """classes[b][t][s] -> logits [B, S, C, T]."""
    B, T, S = len(classes), len(classes[0]), len(classes[0][0])
    logits = torch.zeros(B, S, num_classes, T)
    for b in range(B):
        for t in range(T):
            for s in range(S):
                logits[b, s, classes[b][t][s], t] = 1.0
    return logits


def test_maze_step_and_route_accuracy():
    targets = torch.tensor([[0, 1, 2, 4], [3, 3, 4, 4]])
    preds = _sequence_logits([
        [[0, 1, 2, 4], [0, 0, 0, 0]],   # sample 0: tick 0 whole route right
        [[3, 3, 4, 0], [3, 3, 4, 4]],   # sample 1: tick 0 three of four, tick 1 all
    ], 5)
    tick = torch.tensor([0, 0])
    assert maze_step_accuracy(preds, targets, tick, reduction="none").tolist() == [1.0, 0.75]
    assert maze_route_accuracy(preds, targets, tick, reduction="none").tolist() == [1.0, 0.0]
    assert maze_step_accuracy(preds, targets, tick).item() == pytest.approx(0.875)
    tick = torch.tensor([1, 1])
    assert maze_step_accuracy(preds, targets, tick, reduction="none").tolist() == [0.25, 1.0]
    assert maze_route_accuracy(preds, targets, tick).item() == pytest.approx(0.5)
    # per-tick accuracy on sequences averages the steps of each sample
    assert per_tick_accuracy(preds, targets).tolist() == pytest.approx([(1 + 0.75) / 2, (0.25 + 1) / 2])


def test_parity_position_accuracy():
    targets = torch.tensor([[0, 1, 1], [1, 1, 0], [0, 0, 0]])
    preds = _sequence_logits([
        [[0, 1, 0]],  # right, right, wrong
        [[1, 0, 0]],  # right, wrong, right
        [[0, 0, 1]],  # right, right, wrong
    ], 2)
    tick = torch.zeros(3, dtype=torch.long)
    assert parity_position_accuracy(preds, targets, tick).tolist() == pytest.approx([1.0, 2 / 3, 1 / 3])
    assert parity_position_accuracy(preds, targets, tick, reduction="sum").tolist() == [3, 2, 1]
    weight = torch.tensor([1.0, 0.0, 1.0])
    assert parity_position_accuracy(preds, targets, tick, weight=weight).tolist() == pytest.approx([1.0, 1.0, 0.0])
    with pytest.raises(ValueError, match="sequence predictions"):
        parity_position_accuracy(preds[:, 0], targets, tick)
