"""Certainty losses checked against values worked out with plain Python loops."""

import math

import pytest
import torch

from ctm_dist.losses import (
    image_classification_loss,
    maze_curriculum_mask,
    maze_loss,
    parity_loss,
)


def ce(logits, target):
    """Cross-entropy of one logit vector (a list of floats), by the textbook formula."""
    return -logits[target] + math.log(sum(math.exp(v) for v in logits))


# Classification: B=2, C=3, T=3.  predictions[b, :, t]
LOGITS = [
    [[2.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.5, 0.5, 3.0]],  # sample 0, ticks 0..2
    [[0.0, 0.0, 0.0], [1.0, -1.0, 2.0], [0.0, 4.0, 0.0]],  # sample 1
]
TARGETS = [0, 1]
# certainties[b, 1, t]: sample 0 most certain at tick 2, sample 1 at tick 0
CERT1 = [[0.1, 0.3, 0.9], [0.8, 0.2, 0.5]]


def _classification_tensors():
    preds = torch.tensor(LOGITS).permute(0, 2, 1).contiguous()  # [B, C, T]
    cert = torch.stack([1 - torch.tensor(CERT1), torch.tensor(CERT1)], dim=1)  # [B, 2, T]
    return preds, cert, torch.tensor(TARGETS)


def _expected_classification(samples, use_most_certain=True):
    per_sample = []
    for b in samples:
        losses = [ce(LOGITS[b][t], TARGETS[b]) for t in range(3)]
        chosen = max(range(3), key=lambda t: CERT1[b][t]) if use_most_certain else 2
        per_sample.append((min(losses) + losses[chosen]) / 2)
    return per_sample


def test_classification_loss_matches_hand_computation():
    preds, cert, targets = _classification_tensors()
    loss, tick = image_classification_loss(preds, cert, targets)
    expected = _expected_classification([0, 1])
    assert tick.tolist() == [2, 0]
    assert loss.item() == pytest.approx(sum(expected) / 2, rel=1e-6)
    per_sample, _ = image_classification_loss(preds, cert, targets, reduction="none")
    assert per_sample.tolist() == pytest.approx(expected, rel=1e-6)
    total, _ = image_classification_loss(preds, cert, targets, reduction="sum")
    assert total.item() == pytest.approx(sum(expected), rel=1e-6)


def test_classification_loss_last_tick_when_not_most_certain():
    preds, cert, targets = _classification_tensors()
    loss, tick = image_classification_loss(preds, cert, targets, use_most_certain=False)
    assert tick.tolist() == [2, 2]
    assert loss.item() == pytest.approx(sum(_expected_classification([0, 1], False)) / 2, rel=1e-6)


def test_padded_samples_do_not_count():
    preds, cert, targets = _classification_tensors()
    # A third, padded sample with garbage values must change neither the loss nor get gradient.
    preds = torch.cat([preds, torch.full((1, 3, 3), 50.0)]).requires_grad_(True)
    cert = torch.cat([cert, cert[:1]])
    targets = torch.cat([targets, torch.tensor([2])])
    weight = torch.tensor([1.0, 1.0, 0.0])
    loss, _ = image_classification_loss(preds, cert, targets, weight=weight)
    assert loss.item() == pytest.approx(sum(_expected_classification([0, 1])) / 2, rel=1e-6)
    loss.backward()
    assert torch.all(preds.grad[2] == 0)
    assert preds.grad[:2].abs().sum() > 0
    # Boolean masks work the same way.
    loss_bool, _ = image_classification_loss(preds, cert, targets, weight=weight.bool())
    assert loss_bool.item() == pytest.approx(loss.item())


def test_all_padded_batch_gives_zero_not_nan():
    preds, cert, targets = _classification_tensors()
    preds.requires_grad_(True)
    loss, _ = image_classification_loss(preds, cert, targets, weight=torch.zeros(2))
    assert loss.item() == 0.0
    loss.backward()  # still part of the graph
    assert torch.all(preds.grad == 0)


def test_weight_shape_and_reduction_are_checked():
    preds, cert, targets = _classification_tensors()
    with pytest.raises(ValueError, match="weight must have shape"):
        image_classification_loss(preds, cert, targets, weight=torch.ones(3))
    with pytest.raises(ValueError, match="reduction"):
        image_classification_loss(preds, cert, targets, reduction="avg")


# Parity: B=2, L=2, 2 classes, T=2.  PARITY[b][t][position] = two logits
PARITY = [
    [[[1.0, 0.0], [0.0, 2.0]], [[3.0, 0.0], [0.0, 0.5]]],
    [[[0.0, 0.0], [1.0, 1.0]], [[-1.0, 1.0], [2.0, -2.0]]],
]
PARITY_TARGETS = [[0, 1], [1, 0]]
PARITY_CERT1 = [[0.2, 0.7], [0.6, 0.4]]


def test_parity_loss_matches_hand_computation():
    preds = torch.tensor(PARITY).permute(0, 2, 3, 1).contiguous()  # [B, L, 2, T]
    cert = torch.stack([1 - torch.tensor(PARITY_CERT1), torch.tensor(PARITY_CERT1)], dim=1)
    targets = torch.tensor(PARITY_TARGETS)
    expected = []
    for b in range(2):
        per_tick = [
            sum(ce(PARITY[b][t][p], PARITY_TARGETS[b][p]) for p in range(2)) / 2 for t in range(2)
        ]
        chosen = 1 if PARITY_CERT1[b][1] > PARITY_CERT1[b][0] else 0
        expected.append((min(per_tick) + per_tick[chosen]) / 2)
    loss, tick = parity_loss(preds, cert, targets)
    assert tick.tolist() == [1, 0]
    assert loss.item() == pytest.approx(sum(expected) / 2, rel=1e-6)
    # The model's flat output [B, 2L, T] (position-major) gives the same loss.
    flat_loss, _ = parity_loss(preds.flatten(1, 2), cert, targets)
    assert flat_loss.item() == pytest.approx(loss.item(), rel=1e-6)


def _maze_predictions(correct_pattern, targets, wrong_class=4):
    """Logits [B, S, 5, T] whose argmax equals the target where the pattern says True."""
    b, s, t = len(correct_pattern), len(correct_pattern[0][0]), len(correct_pattern[0])
    preds = torch.zeros(b, s, 5, t)
    for bi in range(b):
        for ti in range(t):
            for si in range(s):
                target = targets[bi][si]
                cls = (
                    target
                    if correct_pattern[bi][ti][si]
                    else (wrong_class if target != wrong_class else 0)
                )
                preds[bi, si, cls, ti] = 2.0 + 0.1 * (si + ti)  # distinct values per step and tick
    return preds


def test_maze_curriculum_extends_past_correct_prefix():
    T, F = True, False
    targets = [[0, 1, 2, 3, 0, 1, 2, 3], [3, 3, 2, 2, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1, 1, 1]]
    pattern = [
        # sample 0: tick 0 gets steps 0-1 right (prefix ends at step 1), tick 1 steps 0-3 (ends at 3)
        [[T, T, F, T, T, T, T, T], [T, T, T, T, F, T, T, T]],
        # sample 1: first step wrong at both ticks -> prefix end counts as step 0
        [[F, T, T, T, T, T, T, T], [F, F, F, F, F, F, F, F]],
        # sample 2: everything right at tick 1 -> prefix ends at the last step (7)
        [[T, F, F, F, F, F, F, F], [T, T, T, T, T, T, T, T]],
    ]
    preds = _maze_predictions(pattern, targets)
    mask, upto = maze_curriculum_mask(preds, torch.tensor(targets), lookahead=2)
    assert upto.tolist() == [3 + 2, 0 + 2, 7 + 2]
    assert mask.tolist() == [
        [1, 1, 1, 1, 1, 0, 0, 0],
        [1, 1, 0, 0, 0, 0, 0, 0],
        [1, 1, 1, 1, 1, 1, 1, 1],
    ]
    _, upto5 = maze_curriculum_mask(preds, torch.tensor(targets))  # default lookahead 5
    assert upto5.tolist() == [8, 5, 12]


def test_maze_loss_matches_hand_computation_and_masks_gradient():
    torch.manual_seed(0)
    B, S, T = 2, 6, 3
    targets = torch.tensor([[0, 1, 2, 3, 4, 4], [2, 2, 3, 3, 0, 1]])
    preds = torch.randn(B, S, 5, T)
    # Sample 0: steps 0-2 right at tick 1 (others random); sample 1: step 0 wrong everywhere.
    for s in range(3):
        preds[0, s, targets[0, s], 1] = 10.0
    for t in range(T):
        preds[1, 0, targets[1, 0], t] = -10.0
    cert = torch.rand(B, 2, T)
    lookahead = 2

    # Expected, by loops over plain floats.
    P, Y, C = preds.tolist(), targets.tolist(), cert.tolist()
    expected_upto, expected = [], []
    for b in range(B):
        furthest = 0
        for t in range(T):
            prefix = 0
            while prefix < S and max(range(5), key=lambda c: P[b][prefix][c][t]) == Y[b][prefix]:
                prefix += 1
            furthest = max(furthest, max(prefix - 1, 0))
        upto = furthest + lookahead
        expected_upto.append(upto)
        n = min(upto, S)
        per_tick = [
            sum(ce([P[b][s][c][t] for c in range(5)], Y[b][s]) for s in range(n)) / n
            for t in range(T)
        ]
        chosen = max(range(T), key=lambda t: C[b][1][t])
        expected.append((min(per_tick) + per_tick[chosen]) / 2)
    assert expected_upto[0] >= 4 and expected_upto[1] == 2

    preds.requires_grad_(True)
    loss, tick, upto = maze_loss(preds, cert, targets, curriculum_lookahead=lookahead)
    assert upto.tolist() == expected_upto
    assert tick.tolist() == cert[:, 1].argmax(-1).tolist()
    assert loss.item() == pytest.approx(sum(expected) / B, rel=1e-5)
    loss.backward()
    # Steps beyond the curriculum get no gradient.
    assert torch.all(preds.grad[1, 2:] == 0)
    assert preds.grad[1, :2].abs().sum() > 0
    # Flat model output [B, 5S, T] is accepted too.
    flat_loss, _, _ = maze_loss(
        preds.detach().flatten(1, 2), cert, targets, curriculum_lookahead=lookahead
    )
    assert flat_loss.item() == pytest.approx(loss.item(), rel=1e-6)


def test_maze_loss_rejects_bad_shapes_and_lookahead():
    with pytest.raises(ValueError, match="multiple"):
        maze_loss(torch.zeros(2, 11, 3), torch.zeros(2, 2, 3), torch.zeros(2, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="lookahead"):
        maze_loss(
            torch.zeros(2, 2, 5, 3),
            torch.zeros(2, 2, 3),
            torch.zeros(2, 2, dtype=torch.long),
            curriculum_lookahead=0,
        )
