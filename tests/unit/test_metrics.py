"""Accuracy metrics on small tensors whose answers are counted by hand."""

import pytest
import torch

from ctm_dist.losses import (
    accuracy_at_most_certain,
    maze_route_accuracy,
    maze_step_accuracy,
    most_certain_tick,
    parity_position_accuracy,
    per_position_accuracy,
    per_tick,
    per_tick_accuracy,
    predictions_at_tick,
    topk_accuracy,
    topk_correct,
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
    assert per_tick_accuracy(preds, targets, weight=weight).tolist() == pytest.approx(
        [1 / 3, 2 / 3, 1 / 3]
    )
    assert accuracy_at_most_certain(preds, targets, tick, weight=weight).item() == pytest.approx(
        2 / 3
    )


def test_predictions_at_tick_picks_per_sample_slices():
    preds = torch.arange(2 * 3 * 4, dtype=torch.float).reshape(2, 3, 4)
    picked = predictions_at_tick(preds, torch.tensor([3, 1]))
    assert picked.tolist() == [preds[0, :, 3].tolist(), preds[1, :, 1].tolist()]


def test_topk_accuracy():
    # one tick; logits ranked so that the target sits at a known rank
    logits = torch.tensor(
        [
            [9.0, 8, 7, 6, 5, 4, 3],  # target 4 is 5th -> top-5 hit, top-1 miss
            [9.0, 8, 7, 6, 5, 4, 3],  # target 5 is 6th -> miss
            [1.0, 2, 3, 4, 5, 6, 7],  # target 6 is 1st -> hit
        ]
    ).unsqueeze(-1)
    targets = torch.tensor([4, 5, 6])
    tick = torch.zeros(3, dtype=torch.long)
    assert topk_accuracy(logits, targets, tick, k=5, reduction="none").tolist() == [1, 0, 1]
    assert topk_accuracy(logits, targets, tick, k=1).item() == pytest.approx(1 / 3)
    assert topk_accuracy(logits, targets, tick, k=6).item() == 1.0
    # k larger than the number of classes means every sample hits
    assert topk_accuracy(logits[:, :3], torch.tensor([0, 1, 2]), tick, k=5).item() == 1.0


def test_topk_ties_count_for_the_lower_class_whatever_the_layout():
    """Equal logits rank by class index (top-1 is argmax's first maximum), the same for a [B, C]
    slice, a [B, C, T] tensor and its non-contiguous transpose, so any batching counts alike."""
    row = torch.tensor([5.0, 3, 3, 3, 3, 3, 3, 0])  # classes 1..6 tie for 2nd place
    logits = row.expand(8, 8)
    targets = torch.arange(8)
    assert topk_correct(logits, targets, k=1).tolist() == [True] + [False] * 7
    assert topk_correct(logits, targets, k=5).tolist() == [True] * 5 + [False] * 3
    assert topk_correct(logits, targets, k=8).all()
    assert torch.equal(
        topk_correct(torch.zeros(3, 4), torch.tensor([0, 1, 3])), torch.tensor([True, False, False])
    )
    per_tick_logits = logits[:, :, None].expand(8, 8, 3)  # [B, C, T], not contiguous
    assert topk_correct(per_tick_logits, targets, k=5)[:, 2].tolist() == [True] * 5 + [False] * 3
    transposed = per_tick_logits.permute(2, 0, 1).contiguous().permute(1, 2, 0)
    assert torch.equal(
        topk_correct(transposed, targets, k=5), topk_correct(per_tick_logits, targets, k=5)
    )
    # at a tick and at every tick: one rule
    tick = torch.full((8,), 2)
    assert torch.equal(
        per_tick_accuracy(per_tick_logits, targets, k=5, reduction="none")[:, 2],
        topk_accuracy(per_tick_logits, targets, tick, k=5, reduction="none"),
    )
    for seed in range(3):  # top-1 is argmax
        x = torch.randn(8, 8, 3, generator=torch.Generator().manual_seed(seed))
        assert torch.equal(topk_correct(x, targets), x.argmax(1) == targets[:, None])


def test_most_certain_tick_takes_the_first_of_equal_ticks_also_running():
    c = torch.tensor([[0.1, 0.5, 0.5, 0.2, 0.7, 0.7], [0.9, 0.9, 0.9, 0.9, 0.9, 0.9]])
    certainties = torch.stack((1 - c, c), 1)
    assert most_certain_tick(certainties).tolist() == [4, 0]
    running = most_certain_tick(certainties, running=True)
    assert running.tolist() == [[0, 1, 1, 1, 4, 4], [0] * 6]
    r = torch.rand(5, 1, 7).round(decimals=1)  # ties
    certainties = torch.cat((1 - r, r), 1)
    assert torch.equal(
        most_certain_tick(certainties, running=True)[:, -1], most_certain_tick(certainties)
    )


def test_per_tick_reads_a_tick_metric_at_every_tick():
    preds = torch.randn(4, 3, 2, 5)
    targets = torch.randint(0, 2, (4, 3))
    every = per_tick(per_position_accuracy, preds, targets, reduction="sum")  # [T, S]
    assert every.shape == (5, 3)
    assert torch.allclose(every.mean(1), per_tick_accuracy(preds, targets, reduction="sum"))


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
    preds = _sequence_logits(
        [
            [[0, 1, 2, 4], [0, 0, 0, 0]],  # sample 0: tick 0 whole route right
            [[3, 3, 4, 0], [3, 3, 4, 4]],  # sample 1: tick 0 three of four, tick 1 all
        ],
        5,
    )
    tick = torch.tensor([0, 0])
    assert maze_step_accuracy(preds, targets, tick, reduction="none").tolist() == [1.0, 0.75]
    assert maze_route_accuracy(preds, targets, tick, reduction="none").tolist() == [1.0, 0.0]
    assert maze_step_accuracy(preds, targets, tick).item() == pytest.approx(0.875)
    tick = torch.tensor([1, 1])
    assert maze_step_accuracy(preds, targets, tick, reduction="none").tolist() == [0.25, 1.0]
    assert maze_route_accuracy(preds, targets, tick).item() == pytest.approx(0.5)
    # per-tick accuracy on sequences averages the steps of each sample
    assert per_tick_accuracy(preds, targets).tolist() == pytest.approx(
        [(1 + 0.75) / 2, (0.25 + 1) / 2]
    )


def test_parity_position_accuracy():
    targets = torch.tensor([[0, 1, 1], [1, 1, 0], [0, 0, 0]])
    preds = _sequence_logits(
        [
            [[0, 1, 0]],  # right, right, wrong
            [[1, 0, 0]],  # right, wrong, right
            [[0, 0, 1]],  # right, right, wrong
        ],
        2,
    )
    tick = torch.zeros(3, dtype=torch.long)
    assert parity_position_accuracy(preds, targets, tick).tolist() == pytest.approx(
        [1.0, 2 / 3, 1 / 3]
    )
    assert parity_position_accuracy(preds, targets, tick, reduction="sum").tolist() == [3, 2, 1]
    weight = torch.tensor([1.0, 0.0, 1.0])
    assert parity_position_accuracy(preds, targets, tick, weight=weight).tolist() == pytest.approx(
        [1.0, 1.0, 0.0]
    )
    with pytest.raises(ValueError, match="sequence predictions"):
        parity_position_accuracy(preds[:, 0], targets, tick)


def test_step_lines_carry_time_elapsed_memory_and_an_eta_from_training_steps_only():
    import io
    import re

    from ctm_dist.train.driver import TICK_NOTE, Display

    out = io.StringIO()
    display = Display(max_steps=100, interactive=False, stream=out)
    t0 = display.started
    first = display.line(
        10, {"train/loss": 1.0, "perf/peak_memory_gib": 1.5}, now=t0 + 50
    )  # 50 s of start-up
    later = display.line(20, {"train/loss": 0.9, "perf/peak_memory_gib": 1.5}, now=t0 + 60)
    assert re.match(
        r"^step 10/100 \| loss 1\.0000 \| mem 1\.50GiB \| \d{4}-\d\d-\d\d \d\d:\d\d:\d\d \| elapsed 0:00:50$",
        first,
    ), first
    # 10 steps took 10 s, 80 remain: 80 s (start-up left out; counting it would say 320 s)
    assert later.endswith("| elapsed 0:01:00 | eta 0:01:20"), later
    display.event({"step": 30, "train/loss": 0.8})
    display.event({"step": 31, "train/loss": 0.7})
    assert out.getvalue().count(TICK_NOTE) == 1 and out.getvalue().splitlines()[0] == TICK_NOTE


def test_config_text_round_trips_without_credentials_in_urls():
    import yaml

    from ctm_dist.train.config import build_config
    from ctm_dist.train.metrics import config_text, peak_memory_gib

    cfg = build_config(overrides=["run.storage=s3://AKIAKEY:hunter2@bucket/runs", "optim.lr=0.01"])
    text = config_text(cfg)
    assert "hunter2" not in text and "AKIAKEY" not in text and "s3://bucket/runs" in text
    back = yaml.safe_load(text)
    assert back["optim"]["lr"] == 0.01 and back["optim"]["betas"] == [0.9, 0.999]
    assert 0.01 < peak_memory_gib() < 1024  # this process's resident set, in GiB
