"""Learning curve of a launcher's run preset: the real trainer in this process, timed per evaluation.

    python bench/learn.py parity --preset parity-small
    python bench/learn.py mazes --preset mazes-small data.url=./data/mazes-small
    python bench/learn.py parity --preset parity-small model.kind=lstm eval.every=100

Builds the config exactly as ``launch/<task>.py --preset NAME [overrides]`` does, then runs it
with one rank (``scale.workers=1``) in this process: the DeepSpeed engine, the task's loaders,
loss and metrics, checkpoints on a local directory (``--out``), no Ray. Each evaluation prints
one line: step, wall minutes, CPU minutes of this process (with ``--threads 1`` the time the run
would take alone on one core), and the held-out metrics; the first and last lines give the
machine's load (``os.getloadavg``), since a shared machine stretches wall time, not CPU time.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ctm_dist.train.cli import config_from_args, make_parser  # noqa: E402
from ctm_dist.train.loop import Trainer  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("task", help="parity, mazes, ...")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--out", help="run directory (default: a temporary one)")
    options, rest = parser.parse_known_args()
    args = make_parser(f"bench/learn.py {options.task}", options.task).parse_intermixed_args(rest)
    torch.set_num_threads(options.threads)
    out = options.out or tempfile.mkdtemp(prefix="ctm-learn-")
    args.overrides = [
        f"run.local_dir={out}/local",
        f"run.storage={out}/store",
        "scale.workers=1",
        *args.overrides,
    ]
    cfg = config_from_args(options.task, args)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0"
    )
    dist.init_process_group("gloo", rank=0, world_size=1)
    started, cpu_started = time.time(), time.process_time()
    print(f"load average at start: {os.getloadavg()[0]:.1f}; run in {out}", flush=True)
    evaluate = Trainer.evaluate

    def timed(self):
        result = evaluate(self)
        metrics = " ".join(
            f"{k.removeprefix('eval/')}={v:.4f}"
            for k, v in result.items()
            if isinstance(v, float) and k != "eval/samples"
        )
        print(
            f"step {self.step}: {(time.time() - started) / 60:.2f} min wall, "
            f"{(time.process_time() - cpu_started) / 60:.2f} min CPU, {metrics}",
            flush=True,
        )
        return result

    Trainer.evaluate = timed
    summary = Trainer(cfg, 0, 1, torch.device("cpu")).fit()
    print(
        f"done at step {summary['step']}: {(time.time() - started) / 60:.2f} min wall, "
        f"{(time.process_time() - cpu_started) / 60:.2f} min CPU; "
        f"load average at end: {os.getloadavg()[0]:.1f}",
        flush=True,
    )
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
