"""Sorting learns through the real trainer: a short run ends well above chance per position.

The trainer's worker loop runs in this process (one gloo rank, no Ray) on generated data, with
checkpoints in a local directory. 5 numbers, so chance per position is 1/5; the model starts by
emitting blanks (0). Measured 2026-12-01 on two loaded CPU cores: 0.66 per position and 0.44 whole
sequences on the held-out numbers after 300 steps (about 20 s of training).
"""

from __future__ import annotations

import torch

from ctm_dist.train.cli import TASK_DEFAULTS
from ctm_dist.train.config import build_config
from ctm_dist.train.loop import Trainer

LENGTH = 5
SHORT_RUN = [
    "model.preset=sort-small",
    f"model.sequence_length={LENGTH}",
    "model.iterations=8",
    "model.d_model=64",
    "model.n_synch_out=32",
    "model.memory_length=4",
    "run.max_steps=300",
    "run.log_every=100",
    "run.seed=0",
    "data.batch_size=64",
    "data.eval_batch_size=256",
    "eval.every=0",
    "eval.batches=4",
    "checkpoint.every=1000",
    "optim.lr=3e-3",
    "optim.warmup_steps=20",
    "optim.schedule=constant",
    "deepspeed.precision=fp32",
    "scale.workers=1",
]


def test_a_short_run_sorts_well_above_chance(tmp_path, process_group, one_torch_thread):
    cfg = build_config(
        None,
        [f"run.storage={tmp_path / 'runs'}", f"run.local_dir={tmp_path / 'local'}", *SHORT_RUN],
        base=TASK_DEFAULTS["sort"],
    )
    summary = Trainer(cfg, 0, 1, torch.device("cpu")).fit()
    chance = 1 / LENGTH
    assert summary["step"] == 300
    assert summary["eval/samples"] == 1024
    assert summary["eval/step_accuracy"] > 2 * chance, summary
    assert summary["eval/sequence_accuracy"] > 0.1, summary
