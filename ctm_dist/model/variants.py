"""Which module a config builds: ``build_model(cfg)`` picks the class for ``cfg.variant``.

Everything that builds a model from a config (the trainer, checkpoint loading, export) goes
through here, so a saved sort run comes back as a sort CTM.
"""

from __future__ import annotations

from .config import CTMConfig
from .ctm import CTM
from .sort import SortCTM

MODELS: dict[str, type[CTM]] = {"ctm": CTM, "sort": SortCTM}


def build_model(cfg: CTMConfig) -> CTM:
    return MODELS[cfg.variant](cfg)
