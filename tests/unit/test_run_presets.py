"""``--preset NAME`` of the launchers: a small model with its training settings, under the command line."""

from __future__ import annotations

import pytest

from ctm_dist.tasks import make_task
from ctm_dist.train.cli import config_from_args, make_parser


def _cfg(task, *argv):
    return config_from_args(task, make_parser("x", task).parse_intermixed_args(list(argv)))


def test_parity_small_sets_the_model_and_its_training_settings():
    cfg = _cfg("parity", "--preset", "parity-small")
    assert (cfg.data.task, cfg.model.preset, cfg.run.name) == (
        "parity",
        "parity-small",
        "parity-small",
    )
    assert (cfg.run.max_steps, cfg.optim.lr, cfg.deepspeed.gradient_clipping) == (1500, 1e-3, 1.0)
    model = make_task(cfg, 0, 1).model_config()
    assert (model.d_model, model.iterations, model.prediction_reshaper) == (128, 16, [16, 2])


def test_the_command_line_wins_over_the_preset():
    cfg = _cfg("parity", "--preset", "parity-small", "--max-steps", "10", "optim.lr=5e-4")
    assert (cfg.run.max_steps, cfg.optim.lr, cfg.model.preset) == (10, 5e-4, "parity-small")
    assert _cfg("parity").model.preset == "parity"  # without --preset: the full-scale model
    lstm = _cfg("parity", "--preset", "parity-small", "model.kind=lstm")
    assert type(make_task(lstm, 0, 1).model_config()).__name__ == "LSTMConfig"


def test_mazes_small_and_tasks_without_small_presets(capsys):
    cfg = _cfg("mazes", "--preset", "mazes-small", "--data", "/data/mazes-small")
    assert (cfg.model.preset, cfg.data.batch_size, cfg.run.max_steps) == ("mazes-small", 32, 600)
    with pytest.raises(SystemExit) as stop:
        _cfg("imagenet", "--preset", "parity-small")
    assert stop.value.code == 2 and "unrecognized arguments" in capsys.readouterr().err
