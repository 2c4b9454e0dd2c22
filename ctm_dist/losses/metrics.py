"""Accuracy metrics for CTM outputs, read at a chosen tick per sample (usually the most certain).

Training (``Task.accumulate``) and offline evaluation (the tasks' ``Measure`` classes) both count
with these functions. A hit is decided by ``topk_correct`` alone: the target is among the k
highest logits, a tie counting for the lower class index (so top-1 agrees with ``argmax``). The
rule does not depend on memory layout or batch size, which ``torch.topk`` does not promise for
equal logits.

Every metric takes an optional ``weight`` [B] (0 for padded samples) and a ``reduction``:
``"mean"`` (over valid samples), ``"sum"`` (for summing across ranks, together with
``weight.sum()``) or ``"none"`` (per sample).

Shapes (T = internal ticks): classification predictions [B, C, T] with targets [B];
sequence tasks (mazes, parity) predictions [B, S, C, T] with targets [B, S].
"""

from __future__ import annotations

import torch

from .certainty import Reduction, _reduce

__all__ = [
    "topk_correct",
    "predictions_at_tick",
    "per_tick",
    "accuracy_at_most_certain",
    "per_tick_accuracy",
    "topk_accuracy",
    "sequence_step_accuracy",
    "sequence_all_correct",
    "per_position_accuracy",
    "maze_step_accuracy",
    "maze_route_accuracy",
    "parity_position_accuracy",
    "parity_accuracy",
]


def topk_correct(
    logits: torch.Tensor, targets: torch.Tensor, k: int = 1, dim: int = 1
) -> torch.Tensor:
    """Booleans: whether the target is among the ``k`` highest logits along ``dim``.

    ``targets`` has the shape of ``logits`` without ``dim``, or fewer trailing dimensions (the
    ticks), over which it is repeated: classification [B, C, T] with [B] gives [B, T]. A class
    ranks before the target when its logit is higher, or equal at a lower index (ties as
    ``argmax``: the first one), so any ``k`` >= the number of classes always hits.
    """
    dim = dim % logits.dim()
    targets = targets.long().to(logits.device)
    while targets.dim() < logits.dim() - 1:
        targets = targets.unsqueeze(-1)
    shape = list(logits.shape)
    del shape[dim]
    index = targets.expand(shape).unsqueeze(dim)
    mine = logits.gather(dim, index)
    classes = torch.arange(logits.size(dim), device=logits.device)
    classes = classes.view([-1] + [1] * (logits.dim() - dim - 1))
    ahead = (logits > mine) | ((logits == mine) & (classes < index))
    return ahead.sum(dim) < k


def predictions_at_tick(predictions: torch.Tensor, tick: torch.Tensor) -> torch.Tensor:
    """Per-sample slice at ``tick`` [B]: [B, ..., T] -> [B, ...]."""
    rows = torch.arange(predictions.size(0), device=predictions.device)
    return predictions.movedim(-1, 1)[rows, tick.to(predictions.device).long()]


def accuracy_at_most_certain(
    predictions: torch.Tensor,
    targets: torch.Tensor,
    tick: torch.Tensor,
    *,
    weight: torch.Tensor | None = None,
    reduction: Reduction = "mean",
) -> torch.Tensor:
    """Top-1 accuracy of classification predictions [B, C, T] at ``tick`` [B]."""
    correct = topk_correct(predictions_at_tick(predictions, tick), targets)
    return _reduce(correct.float(), weight, reduction)


def topk_accuracy(
    predictions: torch.Tensor,
    targets: torch.Tensor,
    tick: torch.Tensor,
    k: int = 5,
    *,
    weight: torch.Tensor | None = None,
    reduction: Reduction = "mean",
) -> torch.Tensor:
    """Whether the target is among the ``k`` highest logits at ``tick`` [B]."""
    hit = topk_correct(predictions_at_tick(predictions, tick), targets, k)
    return _reduce(hit.float(), weight, reduction)


def per_tick_accuracy(
    predictions: torch.Tensor,
    targets: torch.Tensor,
    *,
    k: int = 1,
    weight: torch.Tensor | None = None,
    reduction: Reduction = "mean",
) -> torch.Tensor:
    """Top-``k`` accuracy at every tick: [T] (or [B, T] with ``reduction="none"``).

    For sequence predictions [B, S, C, T] each sample scores the fraction of correct steps.
    """
    if predictions.dim() == 4:
        correct = topk_correct(predictions, targets, k, dim=2).float().mean(dim=1)  # [B, T]
    else:
        correct = topk_correct(predictions, targets, k).float()  # [B, T]
    return _reduce_rows(correct, weight, reduction)


def per_tick(metric, predictions: torch.Tensor, targets: torch.Tensor, **options) -> torch.Tensor:
    """A metric read at one tick per sample (``metric(predictions, targets, tick, **options)``),
    read at every tick in turn: its values stacked along a new first dimension [T, ...]."""
    b, ticks = predictions.size(0), predictions.size(-1)
    return torch.stack(
        [
            metric(predictions, targets, torch.full((b,), t, dtype=torch.long), **options)
            for t in range(ticks)
        ]
    )


def _reduce_rows(
    correct: torch.Tensor, weight: torch.Tensor | None, reduction: str
) -> torch.Tensor:
    """Reduce per-sample rows ``[B, X]`` over the batch, each sample weighted by ``weight`` [B]."""
    if weight is not None:
        if weight.shape != correct.shape[:1]:
            raise ValueError(
                f"weight must have shape {(correct.size(0),)}, got {tuple(weight.shape)}"
            )
        correct = correct * weight.to(correct.dtype).unsqueeze(1)
    if reduction == "none":
        return correct
    if reduction == "sum":
        return correct.sum(dim=0)
    if reduction == "mean":
        total = (
            weight.to(correct.dtype).sum().clamp_min(1e-12)
            if weight is not None
            else correct.size(0)
        )
        return correct.sum(dim=0) / total
    raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")


def _steps_correct(
    predictions: torch.Tensor, targets: torch.Tensor, tick: torch.Tensor
) -> torch.Tensor:
    if predictions.dim() != 4:
        raise ValueError(
            f"sequence predictions must be [B, S, C, T], got shape {tuple(predictions.shape)}"
        )
    return topk_correct(predictions_at_tick(predictions, tick), targets, dim=2)  # [B, S]


def sequence_step_accuracy(
    predictions: torch.Tensor,
    targets: torch.Tensor,
    tick: torch.Tensor,
    *,
    weight: torch.Tensor | None = None,
    reduction: Reduction = "mean",
) -> torch.Tensor:
    """Fraction of correct steps per sample at ``tick``, then reduced over samples."""
    return _reduce(
        _steps_correct(predictions, targets, tick).float().mean(dim=1), weight, reduction
    )


def sequence_all_correct(
    predictions: torch.Tensor,
    targets: torch.Tensor,
    tick: torch.Tensor,
    *,
    weight: torch.Tensor | None = None,
    reduction: Reduction = "mean",
) -> torch.Tensor:
    """Whether every step of a sample is correct at ``tick`` (a solved maze / parity sequence)."""
    return _reduce(_steps_correct(predictions, targets, tick).all(dim=1).float(), weight, reduction)


def per_position_accuracy(
    predictions: torch.Tensor,
    targets: torch.Tensor,
    tick: torch.Tensor,
    *,
    weight: torch.Tensor | None = None,
    reduction: Reduction = "mean",
) -> torch.Tensor:
    """Accuracy of each sequence position at ``tick``: [S] (``"sum"``: correct counts; ``"none"``: [B, S])."""
    correct = _steps_correct(predictions, targets, tick).float()
    return _reduce_rows(correct, weight, reduction)


# Task names for the same measures.
maze_step_accuracy = sequence_step_accuracy
maze_route_accuracy = sequence_all_correct
parity_accuracy = sequence_step_accuracy
parity_position_accuracy = per_position_accuracy
