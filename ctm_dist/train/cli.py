"""The launchers' shared command line: flags and dotted overrides -> a validated config -> the driver.

Exit codes: 0 done (or already complete), 1 training failed, 2 bad config, command line or
surroundings (one ``error:`` line, nothing started), 130 stopped by Ctrl-C with a committed checkpoint,
and the preemption code of :mod:`ctm_dist.train.preemption` (75) when a run was preempted.

Installed as console commands too: ``ctm-train TASK ...`` and ``ctm-imagenet``, ``ctm-cifar10``,
``ctm-mazes``, ``ctm-parity`` (the same as ``python launch/TASK.py``).
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import warnings

from ctm_dist.tasks import get_task, task_names
from ctm_dist.train.config import ConfigError, build_config
from ctm_dist.train.metrics import config_text
from ctm_dist.train.preemption import exit_code_for, preempted_in

# Per-task launcher defaults (``Task.launch_defaults``); the dataclass defaults are the demo's.
TASK_DEFAULTS: dict[str, dict] = {name: get_task(name).launch_defaults for name in task_names()}

CONFIG_DOCS = (
    "Every config field, its default and meaning: ctm_dist/train/config.py (one dataclass per "
    "section; model fields: ctm_dist/model/config.py); full-scale examples per task: configs/*.yaml; "
    "--print-config shows the resolved values"
)
# loggers whose INFO lines are start-up chatter unless --verbose
CHATTY_LOGGERS = ("ray", "ray.train", "ray.data", "DeepSpeed", "deepspeed", "torch.distributed")

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
    base = build_config(None, [], TASK_DEFAULTS[task], validate=False)

    def default(flag: str) -> str:
        section, name = FLAGS[flag].split(".")
        if section == "model":
            value = base.model.overrides.get(name, "the preset's")
        else:
            value = getattr(getattr(base, section), name)
        shown = {
            "data": "the embedded demo (which has its own defaults)"
            if task == "imagenet"
            else "(required)"
            if not get_task(task).generated_data
            else f"generated {task} sequences",
            "storage": "an embedded local object store under run.local_dir",
        }
        return f"{FLAGS[flag]}; default: {shown.get(flag, value)!s}"

    p = _Parser(
        prog=prog,
        description=f"Train the CTM ({task}) with Ray Train + DeepSpeed.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Any config field can be set as section.field=value, e.g. model.d_model=256 optim.lr=1e-3; "
        "later layers win: task defaults < --config FILE < flags and overrides.\n"
        + CONFIG_DOCS
        + ".",
    )
    p.add_argument(
        "--data", metavar="URL", help=f"shard set URL (s3://, file://, a path) [{default('data')}]"
    )
    p.add_argument("--storage", metavar="URL", help=f"where runs live [{default('storage')}]")
    p.add_argument(
        "--name", metavar="RUN", help=f"run name; relaunching a name resumes it [{default('name')}]"
    )
    p.add_argument("--workers", metavar="N", help=f"training workers [{default('workers')}]")
    p.add_argument(
        "--gpus-per-worker", metavar="G", help=f"0 trains on CPU [{default('gpus_per_worker')}]"
    )
    p.add_argument("--zero-stage", metavar="S", help=f"0, 1, 2 or 3 [{default('zero_stage')}]")
    p.add_argument("--precision", metavar="P", help=f"bf16, fp16 or fp32 [{default('precision')}]")
    p.add_argument(
        "--tick-checkpointing",
        metavar="K",
        help=f"recompute ticks in segments of K (0 = off) [{default('tick_checkpointing')}]",
    )
    p.add_argument(
        "--batch-size",
        metavar="B",
        help=f"global batch (micro-batch * workers * accumulation) [{default('batch_size')}]",
    )
    p.add_argument("--max-steps", metavar="N", help=f"[{default('max_steps')}]")
    p.add_argument("--checkpoint-every", metavar="N", help=f"steps [{default('checkpoint_every')}]")
    presets = tuple(get_task(task).run_presets)
    if presets:
        p.add_argument(
            "--preset",
            choices=presets,
            help="a small model with the training settings that go with it, over the task's "
            "defaults (docs/small-presets.md); default: the full-scale model",
        )
    p.add_argument(
        "--config", metavar="FILE.yaml", help="config file (sections as in --print-config)"
    )
    p.add_argument(
        "--ray-address",
        metavar="ADDR",
        help="Ray cluster to join, e.g. 'auto' or HOST:PORT (default: $RAY_ADDRESS, else a new "
        "local one); 'local' always starts a new one",
    )
    p.add_argument(
        "--print-config", action="store_true", help="print the resolved config as YAML and exit"
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar; log lines only")
    p.add_argument(
        "--verbose",
        action="store_true",
        help="also show Ray's, Ray Train's and DeepSpeed's own output (worker logs, warnings)",
    )
    for flag, text in get_task(task).launch_flags.items():  # the task's own flags
        p.add_argument(f"--{flag}", help=text)
    p.add_argument("overrides", nargs="*", metavar="section.field=value")
    return p


def task_base(task: str, preset: str | None = None) -> dict:
    """The task's defaults, with a run preset's settings over them."""
    base = TASK_DEFAULTS[task]
    return _layered(base, get_task(task).run_presets[preset]) if preset else base


def _layered(base: dict, top: dict) -> dict:
    """``base`` with ``top``'s values over it, section by section."""
    out = {key: dict(value) if isinstance(value, dict) else value for key, value in base.items()}
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _layered(out[key], value)
        else:
            out[key] = value
    return out


def config_from_args(task: str, args: argparse.Namespace):
    overrides = [
        f"{field}={getattr(args, flag)}"
        for flag, field in FLAGS.items()
        if getattr(args, flag) is not None
    ]
    flags = {flag: getattr(args, flag, None) for flag in get_task(task).launch_flags}
    overrides += get_task(task).flag_overrides({k: v for k, v in flags.items() if v is not None})
    overrides += list(args.overrides)
    if (
        task == "imagenet"
        and not build_config(args.config, overrides, TASK_DEFAULTS[task], validate=False).data.url
    ):
        task = "demo"  # no data given: the embedded demo instead
    return build_config(args.config, overrides, base=task_base(task, getattr(args, "preset", None)))


def _quiet_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    logging.getLogger("ctm_dist").setLevel(logging.INFO)
    if not verbose:
        for name in CHATTY_LOGGERS:
            logging.getLogger(name).setLevel(logging.ERROR)
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", category=DeprecationWarning)


def main(task: str, argv: list[str] | None = None, prog: str | None = None) -> int:
    args = make_parser(prog or f"launch/{task}.py", task).parse_intermixed_args(argv)
    try:
        cfg = config_from_args(task, args)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.print_config:
        print(config_text(cfg), end="")
        return 0
    _quiet_logging(args.verbose)
    from ctm_dist.train.driver import (
        LaunchRefused,
        summary_lines,
        train,
    )  # Ray: not imported for --help

    try:
        summary = train(
            cfg,
            ray_address=args.ray_address,
            interactive=False if args.quiet else None,
            verbose=args.verbose,
        )
    except LaunchRefused as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(
            f"interrupted without a checkpoint; run the same command again to resume run {cfg.run.name} "
            f"from its last committed checkpoint",
            file=sys.stderr,
        )
        return 130
    except Exception as e:
        stopped = preempted_in(e)
        if stopped is not None:
            if stopped.signum == signal.SIGINT:
                print(
                    f"stopped by Ctrl-C at step {stopped.step}; checkpoint committed. Run the same command "
                    f"again to resume run {cfg.run.name}",
                    file=sys.stderr,
                )
                return 130
            print(
                f"run {cfg.run.name} was preempted at step {stopped.step} (checkpoint committed); relaunch "
                f"with --name {cfg.run.name} to resume",
                file=sys.stderr,
            )
            return _preempted_code(e)
        print(f"error: training failed: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    for line in summary_lines(summary):
        print(line)
    return 0


def run() -> None:
    """``ctm-train TASK [options]``: the launchers as one console command."""
    tasks = [t for t in TASK_DEFAULTS if t != "demo"]
    if len(sys.argv) < 2 or sys.argv[1] not in tasks:
        asked = len(sys.argv) == 2 and sys.argv[1] in ("-h", "--help")
        print(
            f"usage: ctm-train {{{','.join(tasks)}}} [options]  (ctm-train TASK --help lists the options; "
            f"imagenet without --data trains the embedded demo)",
            file=sys.stdout if asked else sys.stderr,
        )
        raise SystemExit(0 if asked else 2)
    raise SystemExit(main(sys.argv[1], sys.argv[2:], prog=f"ctm-train {sys.argv[1]}"))


def _console(task: str):
    def entry() -> None:
        raise SystemExit(main(task, sys.argv[1:], prog=f"ctm-{task}"))

    entry.__name__ = task
    entry.__doc__ = f"``ctm-{task}``: the {task} launcher as a console command."
    return entry


def __getattr__(name: str):
    """``ctm_dist.train.cli:<task>``: the console command of every registered task (pyproject.toml)."""
    if name in task_names() and name != "demo":
        return _console(name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _preempted_code(error: BaseException) -> int:
    return exit_code_for(error)
