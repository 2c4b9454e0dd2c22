"""The Continuous Thought Machine model: config, presets, module and its parts."""

from .config import (
    EXECUTION_FIELDS,
    MAZE_ROUTE_LENGTH,
    OUR_FIELDS,
    PARITY_SEQUENCE_LENGTH,
    PRESET_NAMES,
    CTMConfig,
    preset,
)
from .ctm import (
    CTM,
    Readout,
    ReadoutState,
    TickContext,
    TickOutput,
    TickState,
    Tracking,
    normalised_entropy,
)

__all__ = [
    "CTM",
    "CTMConfig",
    "EXECUTION_FIELDS",
    "MAZE_ROUTE_LENGTH",
    "PARITY_SEQUENCE_LENGTH",
    "OUR_FIELDS",
    "PRESET_NAMES",
    "Readout",
    "ReadoutState",
    "TickContext",
    "TickOutput",
    "TickState",
    "Tracking",
    "normalised_entropy",
    "preset",
]
