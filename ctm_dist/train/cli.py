"""The launchers' shared command line: flags and dotted overrides -> a validated config -> the driver.

Exit codes: 0 done, 1 training failed, 2 bad config or command line (one ``error:`` line, nothing
started), and the preemption code of :mod:`ctm_dist.train.preemption` when a run was preempted.
"""

from __future__ import annotations

import argparse
import logging
import sys

from ctm_dist.train.config import ConfigError, build_config

# Per-task defaults (reference scripts' values where they exist); the dataclass defaults are the demo's.
TASK_DEFAULTS: dict[str, dict] = {
    # The embedded demo: digits at 8x8 (their native resolution) so that bf16 on two CPU cores
    # reaches >= 90% top-1 in a few minutes; tick checkpointing on to exercise it.
    "demo": {"data": {"image_size": 8}, "model": {"tick_checkpointing": 4}},
    "imagenet": {
        "run": {"name": "imagenet", "max_steps": 500_000, "log_every": 100},
        "data": {"task": "imagenet", "batch_size": 64, "eval_batch_size": 64, "num_workers": 8, "image_size": 224},
        "model": {"preset": "imagenet"},
        "optim": {"lr": 5e-4, "warmup_steps": 10_000, "min_lr": 1e-7, "warmup_start_lr": 1e-20},
        "deepspeed": {"gradient_clipping": 20.0},
        "checkpoint": {"every": 1000, "keep": 3},
        "eval": {"every": 5000, "batches": 200},
    },
    "cifar10": {
        "run": {"name": "cifar10", "max_steps": 600_000, "log_every": 100},
        "data": {"task": "cifar10", "batch_size": 512, "eval_batch_size": 512, "num_workers": 4},
        "model": {"preset": "cifar10"},
        "optim": {"lr": 1e-4, "warmup_steps": 1000, "min_lr": 1e-7, "warmup_start_lr": 1e-20},
        "checkpoint": {"every": 1000},
        "eval": {"every": 1000, "batches": 20},
    },
    "mazes": {
        "run": {"name": "mazes", "max_steps": 1_000_000, "log_every": 100},
        "data": {"task": "mazes", "batch_size": 64, "eval_batch_size": 128, "num_workers": 4},
        "model": {"preset": "mazes"},
        "optim": {"lr": 1e-4, "warmup_steps": 10_000, "min_lr": 1e-7, "warmup_start_lr": 1e-20},
        "checkpoint": {"every": 1000},
        "eval": {"every": 1000, "batches": 20},
    },
    "parity": {
        "run": {"name": "parity", "max_steps": 200_000, "log_every": 100},
        "data": {"task": "parity", "batch_size": 64, "eval_batch_size": 256},
        "model": {"preset": "parity"},
        "optim": {"lr": 1e-4, "warmup_steps": 500, "min_lr": 1e-7, "warmup_start_lr": 1e-20},
        "deepspeed": {"gradient_clipping": 0.9},
        "checkpoint": {"every": 10_000},
        "eval": {"every": 1000, "batches": 20},
    },
}

# flag -> dotted config field
FLAGS = {
    "data": "data.url",
    "storage": "run.storage",
    "name": "run.name",
    "workers": "scale.workers",
    "gpus_per_worker": "scale.gpus_per_worker",
    "zero_stage": "deepspeed.zero_stage",
    "precision": "deepspeed.precision",
    "tick_checkpointing": "model.tick_checkpointing",
    "batch_size": "data.batch_size",
    "max_steps": "run.max_steps",
    "checkpoint_every": "checkpoint.every",
}


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, exit 2
        print(f"error: {message}", file=sys.stderr)
        raise SystemExit(2)


def make_parser(prog: str, task: str) -> argparse.ArgumentParser:
    p = _Parser(prog=prog, description=f"Train the CTM ({task}) with Ray Train + DeepSpeed.",
                epilog="Any config field can be set as section.field=value, e.g. model.d_model=256 optim.lr=1e-3.")
    p.add_argument("--data", metavar="URL", help="shard set URL (s3://, file://, a path)")
    p.add_argument("--storage", metavar="URL", help="where runs live; default: an embedded local object store")
    p.add_argument("--name", metavar="RUN", help="run name; relaunching a name resumes it")
    p.add_argument("--workers", metavar="N")
    p.add_argument("--gpus-per-worker", metavar="G")
    p.add_argument("--zero-stage", metavar="S", help="0, 1, 2 or 3")
    p.add_argument("--precision", metavar="P", help="bf16, fp16 or fp32")
    p.add_argument("--tick-checkpointing", metavar="K", help="recompute ticks in segments of K (0 = off)")
    p.add_argument("--batch-size", metavar="B", help="global batch (micro-batch * workers * accumulation)")
    p.add_argument("--max-steps", metavar="N")
    p.add_argument("--checkpoint-every", metavar="N")
    p.add_argument("--config", metavar="FILE.yaml")
    p.add_argument("--ray-address", metavar="ADDR",
                   help="Ray cluster to join, e.g. 'auto' or HOST:PORT (default: $RAY_ADDRESS, else a new "
                        "local one); 'local' always starts a new one")
    p.add_argument("--quiet", action="store_true", help="no progress bar; log lines only")
    p.add_argument("overrides", nargs="*", metavar="section.field=value")
    return p


def config_from_args(task: str, args: argparse.Namespace):
    overrides = [f"{field}={getattr(args, flag)}" for flag, field in FLAGS.items()
                 if getattr(args, flag) is not None]
    overrides += list(args.overrides)
    if task == "imagenet" and not build_config(args.config, overrides, TASK_DEFAULTS[task], validate=False).data.url:
        task = "demo"  # no data given: the embedded demo instead
    return build_config(args.config, overrides, base=TASK_DEFAULTS[task])


def main(task: str, argv: list[str] | None = None, prog: str | None = None) -> int:
    args = make_parser(prog or f"launch/{task}.py", task).parse_intermixed_args(argv)
    try:
        cfg = config_from_args(task, args)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from ctm_dist.train.driver import summary_lines, train

    try:
        summary = train(cfg, ray_address=args.ray_address, interactive=False if args.quiet else None)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        code = _preempted_code(e)
        if code is not None:
            print(f"run {cfg.run.name} was preempted; relaunch with --name {cfg.run.name} to resume", file=sys.stderr)
            return code
        print(f"error: training failed: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    for line in summary_lines(summary):
        print(line)
    return 0


def _preempted_code(error: BaseException) -> int | None:
    try:
        from ctm_dist.train import preemption
    except ImportError:
        return None
    check = getattr(preemption, "exit_code_for", None)
    return check(error) if check else None
