"""Q&A MNIST objective and metrics: the answer is read from the last ``answer_ticks`` ticks only.

The loss is the certainty loss of classification (lowest-loss tick + most-certain tick) over the
answer ticks, as the reference trains it; its LSTM baseline takes the last tick instead of the most
certain. Accuracy is counted per number of operations in the question, the task's difficulty.
"""

from __future__ import annotations

import torch

from .certainty import Reduction, image_classification_loss
from .metrics import accuracy_at_most_certain

__all__ = ["answer_ticks_of", "qamnist_loss", "correct_by_operations"]


def answer_ticks_of(tensor: torch.Tensor, answer_ticks: int) -> torch.Tensor:
    """The last ``answer_ticks`` ticks of predictions or certainties [B, ..., T]."""
    if not 1 <= answer_ticks <= tensor.size(-1):
        raise ValueError(f"answer_ticks must be in [1, {tensor.size(-1)}], got {answer_ticks}")
    return tensor[..., -answer_ticks:]


def qamnist_loss(
    predictions: torch.Tensor,
    certainties: torch.Tensor,
    targets: torch.Tensor,
    answer_ticks: int,
    *,
    use_most_certain: bool = True,
    weight: torch.Tensor | None = None,
    reduction: Reduction = "mean",
) -> tuple[torch.Tensor, torch.Tensor]:
    """predictions [B, 10, T], certainties [B, 2, T], targets [B] -> (loss, tick [B]).

    ``tick`` indexes the answer ticks (0 = the first of them)."""
    return image_classification_loss(
        answer_ticks_of(predictions, answer_ticks),
        answer_ticks_of(certainties, answer_ticks),
        targets,
        use_most_certain=use_most_certain,
        weight=weight,
        reduction=reduction,
    )


def correct_by_operations(
    answer_predictions: torch.Tensor,
    targets: torch.Tensor,
    tick: torch.Tensor,
    operations: torch.Tensor,
    counts: list[int],
    weight: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(correct answers, questions) per number of operations in ``counts``, each [len(counts)].

    ``answer_predictions`` [B, 10, answer ticks] are read at ``tick`` [B]; ``weight`` [B] masks padding.
    Sums, so that ranks can add them before dividing."""
    correct = accuracy_at_most_certain(answer_predictions, targets, tick, reduction="none")
    weight = torch.ones_like(correct) if weight is None else weight.to(correct.dtype)
    by_count = operations.to(correct.device).unsqueeze(0) == torch.tensor(
        counts, device=correct.device
    ).unsqueeze(1)  # [len(counts), B]
    return (by_count * correct * weight).sum(1), (by_count * weight).sum(1)
