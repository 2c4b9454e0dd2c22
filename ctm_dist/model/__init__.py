"""The Continuous Thought Machine model (config, presets, module and its parts) and the LSTM and
feed-forward baselines."""

from .config import (
    EXECUTION_FIELDS,
    MAZE_ROUTE_LENGTH,
    OUR_FIELDS,
    PARITY_SEQUENCE_LENGTH,
    PRESET_NAMES,
    VARIANTS,
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
from .ff import FFBaseline, FFConfig, ReferenceFFBaseline
from .kinds import (
    MODEL_KINDS,
    ModelConfig,
    build_model,
    config_from_dict,
    config_from_fields,
    kind_of,
    kind_of_fields,
    model_config,
)
from .lstm import LSTMBaseline, LSTMConfig
from .qamnist import QAMNISTConfig  # also registers the QAMNIST presets with ``preset``
from .sort import SortCTM, SortTickContext

__all__ = [
    "CTM",
    "CTMConfig",
    "FFBaseline",
    "FFConfig",
    "ReferenceFFBaseline",
    "LSTMBaseline",
    "LSTMConfig",
    "MODEL_KINDS",
    "ModelConfig",
    "build_model",
    "config_from_dict",
    "config_from_fields",
    "kind_of_fields",
    "kind_of",
    "model_config",
    "EXECUTION_FIELDS",
    "MAZE_ROUTE_LENGTH",
    "PARITY_SEQUENCE_LENGTH",
    "OUR_FIELDS",
    "PRESET_NAMES",
    "QAMNISTConfig",
    "Readout",
    "ReadoutState",
    "SortCTM",
    "SortTickContext",
    "TickContext",
    "TickOutput",
    "TickState",
    "Tracking",
    "VARIANTS",
    "build_model",
    "normalised_entropy",
    "preset",
]
