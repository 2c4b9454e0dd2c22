"""Certainty losses of the CTM (classification, parity, mazes with auto-curriculum) and metrics."""

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

__all__ = [
    "as_sequence_predictions",
    "certainty_loss",
    "image_classification_loss",
    "maze_curriculum_mask",
    "maze_loss",
    "most_certain_tick",
    "parity_loss",
    "per_tick_cross_entropy",
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
