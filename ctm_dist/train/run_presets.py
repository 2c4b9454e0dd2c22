"""Named run presets of the launchers (``--preset NAME``): a model preset with the training
settings that go with it, layered over the task's defaults.

The ``-small`` presets learn on a machine with two CPU cores in at most ten minutes (figures in
docs/small-presets.md); the full-scale model presets (``parity``, ``mazes``, ...) stay the
launchers' defaults for real runs.
"""

from __future__ import annotations

from typing import Any

RUN_PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    "parity": {
        "parity-small": {
            "run": {"name": "parity-small", "max_steps": 1500, "log_every": 50},
            "data": {"batch_size": 64, "eval_batch_size": 256},
            "model": {"preset": "parity-small"},
            "optim": {"lr": 1e-3, "warmup_steps": 100, "min_lr": 1e-5, "warmup_start_lr": 1e-6},
            "deepspeed": {"gradient_clipping": 1.0},
            "checkpoint": {"every": 500},
            "eval": {"every": 250, "batches": 4},
        },
    },
    "mazes": {
        "mazes-small": {
            "run": {"name": "mazes-small", "max_steps": 600, "log_every": 50},
            "data": {"batch_size": 32, "eval_batch_size": 256, "num_workers": 0},
            "model": {"preset": "mazes-small"},
            "optim": {"lr": 1e-3, "warmup_steps": 100, "min_lr": 1e-5, "warmup_start_lr": 1e-6},
            "deepspeed": {"gradient_clipping": 1.0},
            "checkpoint": {"every": 300},
            "eval": {"every": 150, "batches": 1},
        },
    },
}


def layered(base: dict, top: dict) -> dict:
    """``base`` with ``top``'s values over it, section by section."""
    out = {key: dict(value) if isinstance(value, dict) else value for key, value in base.items()}
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = layered(out[key], value)
        else:
            out[key] = value
    return out


def run_preset_names(task: str) -> tuple[str, ...]:
    return tuple(RUN_PRESETS.get(task, {}))
