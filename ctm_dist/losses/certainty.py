"""Certainty-based losses of the CTM: every tick predicts, two ticks are trained.

For each sample the cross-entropy is computed at every internal tick. The loss of a
sample is the mean of two of them: the tick where the loss is lowest and the tick where
the model is most certain (largest ``certainties[:, 1]``, i.e. 1 - normalised entropy).
This is the objective of the reference implementation; the per-sample form here lets
the trainer weight or mask samples (ranks pad the last batches of an epoch).

Shapes (T = internal ticks):
    classification: predictions [B, C, T],       targets [B]
    parity:         predictions [B, L, 2, T],     targets [B, L]   (or flat [B, 2L, T])
    mazes:          predictions [B, S, 5, T],     targets [B, S]   (or flat [B, 5S, T])
    certainties:    [B, 2, T]
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

Reduction = Literal["mean", "sum", "none"]

__all__ = [
    "certainty_loss",
    "image_classification_loss",
    "parity_loss",
    "maze_loss",
    "maze_curriculum_mask",
    "per_tick_cross_entropy",
    "most_certain_tick",
    "as_sequence_predictions",
]


def most_certain_tick(certainties: torch.Tensor, *, running: bool = False) -> torch.Tensor:
    """Index [B] of the tick with the highest certainty ``certainties[:, 1]``, the first on ties.

    With ``running``: [B, T], at each tick t the most certain of ticks 0..t by the same rule (the
    tick an answer read at t would use), so its last column is the [B] index.
    """
    certainty = certainties[:, 1]
    if not running:
        return certainty.argmax(dim=-1)
    best = certainty.cummax(dim=-1).values  # [B, T]; cummax's own indices take the last tie
    # the first tick reaching the best so far is at or before t, where that best was reached
    return (certainty.unsqueeze(1) == best.unsqueeze(2)).int().argmax(dim=-1)


def per_tick_cross_entropy(predictions: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy at every tick: predictions [B, C, T] or [B, S, C, T] -> [B, T] or [B, S, T]."""
    ticks = predictions.size(-1)
    if predictions.dim() == 3:
        return F.cross_entropy(
            predictions, targets.long().unsqueeze(-1).expand(-1, ticks), reduction="none"
        )
    if predictions.dim() == 4:
        b, s = predictions.shape[:2]
        flat = predictions.flatten(0, 1)  # [B*S, C, T]
        flat_targets = targets.long().reshape(b * s, 1).expand(-1, ticks)
        return F.cross_entropy(flat, flat_targets, reduction="none").reshape(b, s, ticks)
    raise ValueError(
        f"predictions must be [B, C, T] or [B, S, C, T], got shape {tuple(predictions.shape)}"
    )


def as_sequence_predictions(predictions: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """View flat model output [B, S*C, T] as [B, S, C, T] using the sequence length of targets [B, S]."""
    if predictions.dim() == 4:
        return predictions
    if predictions.dim() != 3 or targets.dim() != 2:
        raise ValueError(
            f"expected predictions [B, S*C, T] with targets [B, S]; got {tuple(predictions.shape)} and {tuple(targets.shape)}"
        )
    b, flat, ticks = predictions.shape
    steps = targets.size(1)
    if flat % steps:
        raise ValueError(
            f"prediction width {flat} is not a multiple of the sequence length {steps}"
        )
    return predictions.reshape(b, steps, flat // steps, ticks)


def _reduce(
    per_sample: torch.Tensor, weight: torch.Tensor | None, reduction: Reduction
) -> torch.Tensor:
    if weight is not None:
        weight = weight.to(per_sample.dtype)
        if weight.shape != per_sample.shape:
            raise ValueError(
                f"weight must have shape {tuple(per_sample.shape)}, got {tuple(weight.shape)}"
            )
        per_sample = per_sample * weight
    if reduction == "none":
        return per_sample
    if reduction == "sum":
        return per_sample.sum()
    if reduction == "mean":
        if weight is None:
            return per_sample.mean()
        # A batch of padding only gives 0 (still attached to the graph), not NaN.
        return per_sample.sum() / weight.sum().clamp_min(1e-12)
    raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")


def certainty_loss(
    tick_losses: torch.Tensor,
    certainties: torch.Tensor | None,
    *,
    use_most_certain: bool = True,
    weight: torch.Tensor | None = None,
    reduction: Reduction = "mean",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Combine per-tick losses [B, T] into the CTM objective.

    Returns ``(loss, tick)`` where ``tick`` [B] is the most-certain tick (the last tick
    when ``use_most_certain`` is False or there are no certainties). ``weight`` [B]
    scales each sample (0 drops a padded one); with ``reduction="mean"`` the result is
    divided by the sum of weights, so it is the mean over valid samples.
    """
    b, ticks = tick_losses.shape
    lowest = tick_losses.argmin(dim=1)
    if use_most_certain and certainties is not None:
        chosen = most_certain_tick(certainties)
    else:
        chosen = torch.full((b,), ticks - 1, dtype=torch.long, device=tick_losses.device)
    rows = torch.arange(b, device=tick_losses.device)
    per_sample = 0.5 * (tick_losses[rows, lowest] + tick_losses[rows, chosen])
    return _reduce(per_sample, weight, reduction), chosen


def image_classification_loss(
    predictions: torch.Tensor,
    certainties: torch.Tensor,
    targets: torch.Tensor,
    *,
    use_most_certain: bool = True,
    weight: torch.Tensor | None = None,
    reduction: Reduction = "mean",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Certainty loss for classification: predictions [B, C, T], targets [B] -> (loss, tick [B])."""
    return certainty_loss(
        per_tick_cross_entropy(predictions, targets),
        certainties,
        use_most_certain=use_most_certain,
        weight=weight,
        reduction=reduction,
    )


def parity_loss(
    predictions: torch.Tensor,
    certainties: torch.Tensor,
    targets: torch.Tensor,
    *,
    use_most_certain: bool = True,
    weight: torch.Tensor | None = None,
    reduction: Reduction = "mean",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Certainty loss for parity: the cross-entropy is averaged over positions before picking ticks.

    predictions [B, L, 2, T] (or the model's flat [B, 2L, T]), targets [B, L] in {0, 1}.
    """
    predictions = as_sequence_predictions(predictions, targets)
    tick_losses = per_tick_cross_entropy(predictions, targets).mean(dim=1)  # [B, T]
    return certainty_loss(
        tick_losses,
        certainties,
        use_most_certain=use_most_certain,
        weight=weight,
        reduction=reduction,
    )


def maze_curriculum_mask(
    predictions: torch.Tensor, targets: torch.Tensor, lookahead: int = 5
) -> tuple[torch.Tensor, torch.Tensor]:
    """Auto-curriculum of the maze loss.

    At each tick find the last step of the longest correctly predicted prefix of the
    route (step 0 counts even when wrong); take the furthest over ticks and train on the
    route up to ``lookahead`` steps beyond it. Returns ``(mask [B, S] float, upto [B] long)``
    where ``mask[b, s] = s < upto[b]``.
    """
    if lookahead < 1:
        raise ValueError(f"lookahead must be >= 1, got {lookahead}")
    correct = predictions.argmax(dim=2) == targets.unsqueeze(-1)  # [B, S, T]
    prefix_len = correct.long().cumprod(dim=1).sum(dim=1)  # [B, T] leading correct steps
    last_prefix_step = (prefix_len - 1).clamp_min(0)
    upto = last_prefix_step.max(dim=-1).values + lookahead  # [B]
    steps = torch.arange(predictions.size(1), device=predictions.device)
    mask = (steps.unsqueeze(0) < upto.unsqueeze(1)).to(predictions.dtype)
    return mask, upto


def maze_loss(
    predictions: torch.Tensor,
    certainties: torch.Tensor | None,
    targets: torch.Tensor,
    *,
    curriculum_lookahead: int = 5,
    use_most_certain: bool = True,
    weight: torch.Tensor | None = None,
    reduction: Reduction = "mean",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Certainty loss for maze routes with the auto-extending curriculum.

    predictions [B, S, 5, T] (or flat [B, 5S, T]), targets [B, S] with moves
    0..4 = up, down, left, right, wait. The cross-entropy is averaged over the steps the
    curriculum admits. Returns ``(loss, tick [B], upto [B])``.
    """
    predictions = as_sequence_predictions(predictions, targets)
    step_losses = per_tick_cross_entropy(predictions, targets)  # [B, S, T]
    with torch.no_grad():
        mask, upto = maze_curriculum_mask(predictions, targets, curriculum_lookahead)
    mask = mask.unsqueeze(-1)
    tick_losses = (step_losses * mask).sum(dim=1) / mask.sum(dim=1)  # [B, T]
    loss, tick = certainty_loss(
        tick_losses,
        certainties,
        use_most_certain=use_most_certain,
        weight=weight,
        reduction=reduction,
    )
    return loss, tick, upto
