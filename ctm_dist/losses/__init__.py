"""Losses of the CTM (certainty: classification, parity, mazes with auto-curriculum; CTC: sorting) and metrics."""

from .certainty import (
    as_sequence_predictions,
    certainty_loss,
    image_classification_loss,
    maze_curriculum_mask,
    maze_loss,
    most_certain_tick,
    parity_loss,
    per_tick_cross_entropy,
)
from .metrics import (
    accuracy_at_most_certain,
    maze_route_accuracy,
    maze_step_accuracy,
    parity_accuracy,
    parity_position_accuracy,
    per_position_accuracy,
    per_tick_accuracy,
    predictions_at_tick,
    sequence_all_correct,
    sequence_step_accuracy,
    topk_accuracy,
)
from .sort import decode_sort, sort_loss, sort_position_accuracy, sort_sequence_accuracy

__all__ = [
    "as_sequence_predictions",
    "certainty_loss",
    "image_classification_loss",
    "maze_curriculum_mask",
    "maze_loss",
    "most_certain_tick",
    "parity_loss",
    "per_tick_cross_entropy",
    "sort_loss",
    "decode_sort",
    "sort_position_accuracy",
    "sort_sequence_accuracy",
    "accuracy_at_most_certain",
    "maze_route_accuracy",
    "maze_step_accuracy",
    "parity_accuracy",
    "parity_position_accuracy",
    "per_position_accuracy",
    "per_tick_accuracy",
    "predictions_at_tick",
    "sequence_all_correct",
    "sequence_step_accuracy",
    "topk_accuracy",
]
