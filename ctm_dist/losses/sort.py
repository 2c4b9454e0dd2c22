"""Sorting with the CTM: CTC loss over the ticks, its greedy decoding, and sorting accuracy.

The sort variant predicts, at every tick, one of N classes (an input position) or a blank (the
last class, N). The target is the permutation that sorts the input (``argsort``). As in the
reference, the ticks are the CTC time axis: ``torch.nn.functional.ctc_loss`` over the
log-softmax of every tick, each sample's loss divided by its target length, then averaged.

Decoding follows the reference's greedy (best-path) decoder: take the most likely class at each
tick and emit it unless it is the blank or equal to the last class emitted (a blank in between
does not reset that, unlike textbook CTC; a sorting target never repeats a position, so this
only changes wrong outputs). For accuracy the emitted sequence is cut to N, or padded with the
blank, and compared position by position, as the reference's curves do.

Shapes: predictions ``[B, N + 1, T]`` (logits), targets ``[B, N]`` (long).
"""

from __future__ import annotations

import torch
from torch.nn import functional as F

from .certainty import Reduction, _reduce

__all__ = [
    "sort_loss",
    "decode_sort",
    "sort_position_accuracy",
    "sort_sequence_accuracy",
]


def _check(predictions: torch.Tensor, targets: torch.Tensor) -> None:
    if predictions.dim() != 3 or targets.dim() != 2 or predictions.size(0) != targets.size(0):
        raise ValueError(
            f"expected predictions [B, N + 1, T] and targets [B, N]; got "
            f"{tuple(predictions.shape)} and {tuple(targets.shape)}"
        )
    if predictions.size(1) != targets.size(1) + 1:
        raise ValueError(
            f"predictions have {predictions.size(1)} classes; sorting {targets.size(1)} values "
            f"needs {targets.size(1) + 1} (one per position and a blank)"
        )


def sort_loss(
    predictions: torch.Tensor,
    targets: torch.Tensor,
    *,
    weight: torch.Tensor | None = None,
    reduction: Reduction = "mean",
) -> torch.Tensor:
    """CTC loss of the per-tick predictions against the sorting permutation (blank = last class)."""
    _check(predictions, targets)
    b, classes, ticks = predictions.shape
    length = targets.size(1)
    if ticks < length:
        raise ValueError(
            f"CTC needs at least one tick per output: {ticks} ticks cannot emit {length} values"
        )
    log_probs = F.log_softmax(predictions.float(), dim=1).permute(2, 0, 1)  # [T, B, C]
    per_sample = F.ctc_loss(
        log_probs,
        targets.long(),
        torch.full((b,), ticks, dtype=torch.long),
        torch.full((b,), length, dtype=torch.long),
        blank=classes - 1,
        reduction="none",
    )
    return _reduce(per_sample / length, weight, reduction)


def decode_sort(predictions: torch.Tensor, length: int | None = None) -> torch.Tensor:
    """Greedy decoding ``[B, C, T]`` -> ``[B, length]`` (default ``C - 1``), padded with the blank."""
    b, classes, ticks = predictions.shape
    blank = classes - 1
    length = blank if length is None else length
    best = predictions.argmax(dim=1)  # [B, T]
    rows = torch.arange(b, device=predictions.device)
    decoded = torch.full((b, length), blank, dtype=torch.long, device=predictions.device)
    last = torch.full((b,), -1, dtype=torch.long, device=predictions.device)
    count = torch.zeros(b, dtype=torch.long, device=predictions.device)
    for t in range(ticks):
        symbol = best[:, t]
        emit = (symbol != blank) & (symbol != last)
        write = emit & (count < length)
        decoded[rows[write], count[write]] = symbol[write]
        last = torch.where(emit, symbol, last)
        count = count + emit.long()
    return decoded


def sort_position_accuracy(
    predictions: torch.Tensor,
    targets: torch.Tensor,
    *,
    weight: torch.Tensor | None = None,
    reduction: Reduction = "mean",
) -> torch.Tensor:
    """Fraction of positions of the decoded order equal to the target's, per sample."""
    return _reduce(_decoded_correct(predictions, targets).float().mean(dim=1), weight, reduction)


def sort_sequence_accuracy(
    predictions: torch.Tensor,
    targets: torch.Tensor,
    *,
    weight: torch.Tensor | None = None,
    reduction: Reduction = "mean",
) -> torch.Tensor:
    """Whether the whole decoded order equals the target, per sample."""
    return _reduce(_decoded_correct(predictions, targets).all(dim=1).float(), weight, reduction)


def _decoded_correct(predictions: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """[B, N]: whether each position of the decoded order equals the target's."""
    _check(predictions, targets)
    return decode_sort(predictions, targets.size(1)) == targets
