"""Fine-tuning: a run whose first weights come from a checkpoint (``model.init_from``).

Any checkpoint ``ctm_dist.load`` reads will do: an export or a run of ours, a reference
checkpoint, or the reference's Hugging Face layout (a directory or a Hub repository id). The
model then has the checkpoint's architecture; only how it executes (tick checkpointing,
compilation, ...) comes from the run's config, and the output the task needs (classes, route
or sequence length) must be the checkpoint's. A run that resumes from its own checkpoint
ignores ``init_from``: its weights come from that checkpoint.
"""

from __future__ import annotations

import os

from torch import nn

from ctm_dist.eval.loading import load_model
from ctm_dist.model import EXECUTION_FIELDS, CTMConfig, ModelConfig, build_model, kind_of


class InitError(ValueError):
    """``model.init_from`` cannot start this run; one line says why."""


def absolute_source(source: str) -> str:
    """A local path made absolute (workers run in another directory); URLs and Hub ids unchanged."""
    return os.path.abspath(source) if source and os.path.exists(source) else source


def initial_model(source: str, kind: str, task_cfg: ModelConfig) -> tuple[ModelConfig, nn.Module]:
    """(config, model with the weights of ``source``) for a run of ``kind`` whose task wants ``task_cfg``."""
    try:
        loaded = load_model(source).model
    except (OSError, ValueError) as err:  # CheckpointError is a ValueError
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise InitError(f"model.init_from={source}: {first}") from None
    cfg = loaded.cfg
    if kind_of(cfg) != kind:
        raise InitError(
            f"model.init_from={source} holds a {kind_of(cfg)} model; set model.kind={kind_of(cfg)}"
        )
    wanted = (task_cfg.out_dims, list(task_cfg.prediction_reshaper))
    if (cfg.out_dims, list(cfg.prediction_reshaper)) != wanted:
        raise InitError(
            f"model.init_from={source} predicts out_dims={cfg.out_dims} shaped "
            f"{cfg.prediction_reshaper}; this task needs out_dims={wanted[0]} shaped {wanted[1]}"
        )
    if isinstance(cfg, CTMConfig):
        cfg = cfg.replace(**{name: getattr(task_cfg, name) for name in EXECUTION_FIELDS})
    model = build_model(cfg)
    model.load_state_dict(loaded.state_dict(), strict=True)
    return cfg, model
