"""The Continuous Thought Machine model: config, presets, module and its parts."""

from .config import PRESET_NAMES, CTMConfig, preset
from .ctm import CTM, Readout, ReadoutState, TickContext, TickOutput, TickState, Tracking, normalised_entropy

__all__ = ["CTM", "CTMConfig", "PRESET_NAMES", "Readout", "ReadoutState", "TickContext", "TickOutput", "TickState",
           "Tracking", "normalised_entropy", "preset"]
