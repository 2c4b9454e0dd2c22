"""The launchers' shared command line: flags map to config fields; bad input stops before Ray starts."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ctm_dist.train.cli import config_from_args, make_parser

REPO = Path(__file__).resolve().parents[1]


def _cfg(task, *argv):
    return config_from_args(task, make_parser("x", task).parse_intermixed_args(list(argv)))


def test_flags_and_dotted_overrides_reach_the_config(tmp_path):
    yaml_file = tmp_path / "c.yaml"
    yaml_file.write_text("optim: {lr: 0.5}\nrun: {max_steps: 7}\n")
    cfg = _cfg("imagenet", "--data", "s3://b/imagenet", "--storage", "s3://b/runs", "--name", "r1",
               "--workers", "4", "--gpus-per-worker", "1", "--zero-stage", "3", "--precision", "fp16",
               "--tick-checkpointing", "5", "--batch-size", "128", "--checkpoint-every", "50",
               "--config", str(yaml_file), "model.d_model=256", "optim.lr=1e-3")
    assert (cfg.data.url, cfg.run.storage, cfg.run.name) == ("s3://b/imagenet", "s3://b/runs", "r1")
    assert (cfg.scale.workers, cfg.scale.gpus_per_worker, cfg.deepspeed.zero_stage) == (4, 1.0, 3)
    assert cfg.deepspeed.precision == "fp16" and cfg.data.batch_size == 128 and cfg.checkpoint.every == 50
    assert cfg.model.preset == "imagenet" and cfg.data.task == "imagenet"
    assert cfg.model.overrides == {"tick_checkpointing": 5, "d_model": 256}
    assert cfg.optim.lr == pytest.approx(1e-3)  # the override beats the YAML file
    assert cfg.run.max_steps == 7  # the YAML beats the task default


def test_imagenet_launcher_without_data_is_the_demo():
    cfg = _cfg("imagenet")
    assert cfg.data.task == "demo" and cfg.model.preset == "demo" and cfg.data.url == ""
    assert (cfg.scale.workers, cfg.deepspeed.zero_stage, cfg.deepspeed.precision) == (2, 2, "bf16")
    assert cfg.model.overrides.get("tick_checkpointing", 0) > 0
    assert cfg.eval.every > 0 and cfg.checkpoint.every > 0
    assert _cfg("parity").data.task == "parity" and _cfg("parity").model.preset == "parity"


@pytest.mark.parametrize("launcher, args, fragment", [
    ("imagenet.py", ["--zero-stage", "4"], "zero_stage must be 0, 1, 2 or 3"),
    ("imagenet.py", ["--batch-size", "63"], "not divisible by scale.workers"),
    ("imagenet.py", ["optim.nope=1"], "unknown config field 'optim.nope'"),
    ("mazes.py", [], "data.url is required for task 'mazes'"),
    ("cifar10.py", ["--workers", "two"], "scale.workers: expected an integer"),
    ("parity.py", ["--bogus"], "unrecognized arguments: --bogus"),
])
def test_bad_input_is_one_line_and_exit_2_before_anything_starts(launcher, args, fragment, tmp_path):
    env = dict(os.environ, RAY_ADDRESS="127.0.0.1:1")  # would hang/fail if anything tried to reach Ray
    started = time.monotonic()
    proc = subprocess.run([sys.executable, str(REPO / "launch" / launcher), *args, f"run.local_dir={tmp_path}"],
                          capture_output=True, text=True, timeout=120, env=env, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and fragment in lines[0], proc.stderr
    assert proc.stdout == ""
    assert not any(tmp_path.iterdir()), "something was created before the config was validated"
    assert time.monotonic() - started < 60


def test_bad_yaml_file_is_one_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("optim: {lr: [1, 2\n")
    proc = subprocess.run([sys.executable, str(REPO / "launch" / "imagenet.py"), "--config", str(bad)],
                          capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("error: bad YAML in") and len(proc.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("problem", ["missing shard index", "wrong credentials"])
def test_unusable_data_or_storage_fails_once_before_any_worker_starts(problem, object_store, s3_bucket, tmp_path):
    """Checked in the driver, so Ray never starts (and never retries workers) for input that cannot work."""
    env = dict(os.environ, **object_store.env(), RAY_ADDRESS="127.0.0.1:1")  # reaching Ray would fail
    wrong = "wrong-secret-0123456789abcdef"
    if problem == "wrong credentials":
        env["AWS_SECRET_ACCESS_KEY"] = wrong
    started = time.monotonic()
    proc = subprocess.run([sys.executable, str(REPO / "launch" / "imagenet.py"), f"run.local_dir={tmp_path}",
                           f"run.storage=s3://{s3_bucket}/runs", f"data.url=s3://{s3_bucket}/nothing-here"],
                          capture_output=True, text=True, timeout=120, env=env, cwd=tmp_path)
    assert proc.returncode == 1, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    fragment = "no shard index 'train.json'" if problem == "missing shard index" else "access denied"
    assert last.startswith("error: training failed") and fragment in last, proc.stderr[-2000:]
    assert wrong not in proc.stderr + proc.stdout and object_store.secret_key not in proc.stderr + proc.stdout
    assert "127.0.0.1:1" not in proc.stderr, "the driver tried to reach Ray before checking its input"
    assert time.monotonic() - started < 60
