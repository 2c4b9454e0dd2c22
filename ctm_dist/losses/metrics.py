"""Accuracy metrics for CTM outputs, read at a chosen tick per sample (usually the most certain).

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
    "predictions_at_tick",
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
    correct = predictions_at_tick(predictions, tick).argmax(dim=1) == targets
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
    logits = predictions_at_tick(predictions, tick)  # [B, C]
    k = min(k, logits.size(1))
    top = logits.topk(k, dim=1).indices
    hit = (top == targets.unsqueeze(1)).any(dim=1)
    return _reduce(hit.float(), weight, reduction)


def per_tick_accuracy(
    predictions: torch.Tensor,
    targets: torch.Tensor,
    *,
    weight: torch.Tensor | None = None,
    reduction: Reduction = "mean",
) -> torch.Tensor:
    """Top-1 accuracy at every tick: [T] (or [B, T] with ``reduction="none"``).

    For sequence predictions [B, S, C, T] each sample scores the fraction of correct steps.
    """
    if predictions.dim() == 4:
        correct = (predictions.argmax(dim=2) == targets.unsqueeze(-1)).float().mean(dim=1)  # [B, T]
    else:
        correct = (predictions.argmax(dim=1) == targets.unsqueeze(-1)).float()  # [B, T]
    return _reduce_rows(correct, weight, reduction)


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
    return predictions_at_tick(predictions, tick).argmax(dim=2) == targets  # [B, S]


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
