"""Time DeepSpeed ZeRO-2 against ZeRO-3 training steps of the CTM, and count ZeRO-3's parameter gathers.

    python bench/zero.py --device cpu --ranks 2 --preset demo --batch 16 --steps 5
    python bench/zero.py --device cuda --ranks 1 --preset parity --batch 64 --steps 10

Each rank is a process (gloo on CPU, NCCL on CUDA) that builds the engine with
``ctm_dist.train.engine.build_engine`` and times whole steps (forward, certainty loss,
``engine.backward``, ``engine.step``) after two warm-up steps, the variants in turns; "vs ZeRO-2"
is the median of per-round ratios, "last loss" rank 0's loss of the last step (every variant
starts from the same weights and sees the same batch), "step peak CUDA MB" what the last step
allocated at its peak above what was allocated before it (the engines of all variants share the
process, so their resident state is left out). Rows: ZeRO-2; ZeRO-3 as
``build_engine`` sets it up (every parameter gathered once per forward and once per backward);
and, with ``--per-module``, ZeRO-3 with DeepSpeed's default per-module gathering, which gathers
the tick modules' parameters again at every tick. "fetches/step" counts ZeRO-3's module
fetches per step on rank 0 (each runs DeepSpeed's parameter coordinator from a module hook);
"gathers/step" the parameters those fetches all-gathered (DeepSpeed keeps a parameter that will
be used again soon, and never partitions parameters under 100k elements, so this is smaller). Prints one markdown table.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from step import certainty_loss, make_batch, parse_overrides, table_row  # noqa: E402

import ctm_dist.train.engine as engine_module  # noqa: E402
from ctm_dist.model import CTM, preset  # noqa: E402
from ctm_dist.train.config import build_config  # noqa: E402

COLUMNS = [
    "variant",
    "ranks",
    "precision",
    "step s",
    "vs ZeRO-2",
    "fetches/step",
    "gathers/step",
    "last loss",
    "step peak CUDA MB",
]


def count_module_fetches(engine) -> list[int]:
    """Count ZeRO-3's per-module fetches (each runs the coordinator, whether or not it all-gathers)."""
    count = [0]
    if engine.zero_optimization_stage() == 3:
        coordinator = engine.optimizer.parameter_offload.get_param_coordinator()
        fetch = coordinator.fetch_sub_module

        def counted(*args, **kwargs):
            count[0] += 1
            return fetch(*args, **kwargs)

        coordinator.fetch_sub_module = counted
    return count


def count_parameter_gathers(module: torch.nn.Module) -> list[int]:
    """Wrap every ZeRO-3 parameter's gather so that each parameter fetched counts once."""
    count = [0]
    for parameter in module.parameters():
        if not hasattr(parameter, "all_gather_coalesced"):
            return count  # not a ZeRO-3 parameter

        def counted(params, *args, _gather=parameter.all_gather_coalesced, **kwargs):
            params = list(params)
            count[0] += len(params)
            return _gather(params, *args, **kwargs)

        parameter.all_gather_coalesced = counted
    return count


class Variant:
    """One DeepSpeed engine over a freshly seeded CTM, timed one training step at a time."""

    def __init__(self, args, stage: int, per_module: bool, device: torch.device):
        cfg = build_config(
            None,
            [
                f"scale.workers={args.ranks}",
                f"data.batch_size={args.batch * args.ranks}",
                f"deepspeed.zero_stage={stage}",
                f"deepspeed.precision={args.precision}",
                "deepspeed.gradient_clipping=1.0",
                "optim.warmup_steps=0",
                "optim.schedule=constant",
            ],
        )
        overrides = parse_overrides(args.set, args.preset)
        if args.iterations is not None:
            overrides["iterations"] = args.iterations
        self.model_cfg = preset(args.preset, **overrides)
        np.random.seed(0)
        torch.manual_seed(0)
        model = CTM(self.model_cfg)
        gather_once = engine_module.gather_once_per_pass
        if per_module:
            engine_module.gather_once_per_pass = lambda engine: None
        try:
            self.engine = engine_module.build_engine(model, cfg)
        finally:
            engine_module.gather_once_per_pass = gather_once
        self.gathers = count_parameter_gathers(self.engine.module)
        self.fetches = count_module_fetches(self.engine)
        x, targets = make_batch(self.model_cfg, args.preset, args.batch, args.image_size)
        self.x, self.targets = x.to(device, engine_module.model_dtype(cfg)), targets.to(device)
        self.device, self.stage = device, stage
        self.name = f"ZeRO-{stage}" + (
            " per-module gathers" if per_module else (" gather once" if stage == 3 else "")
        )
        self.times: list[float] = []
        self.counts: list[int] = []
        self.peak_mb = float("nan")

    def step(self, record: bool = True) -> None:
        cuda = self.device.type == "cuda"
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
        self.gathers[0] = self.fetches[0] = 0
        start = time.perf_counter()
        predictions, certainties, _ = self.engine(self.x)
        loss = certainty_loss(
            predictions.float(),
            certainties.float(),
            self.targets,
            self.model_cfg.prediction_reshaper,
        )
        self.engine.backward(loss)
        self.engine.step()
        self.last_loss = loss.item()
        if cuda:
            torch.cuda.synchronize()
            self.peak_mb = (torch.cuda.max_memory_allocated() - before) / 2**20
        if record:
            self.times.append(time.perf_counter() - start)
            self.counts.append((self.gathers[0], self.fetches[0]))

    def row(self, zero2: Variant) -> dict:
        ratios = sorted(a / b for a, b in zip(self.times, zero2.times))
        return dict(
            variant=self.name,
            stage=self.stage,
            seconds=statistics.median(self.times),
            ratio=statistics.median(ratios),
            gathers=statistics.median(c[0] for c in self.counts),
            fetches=statistics.median(c[1] for c in self.counts),
            loss=self.last_loss,
            peak_mb=self.peak_mb,
        )


def _worker(rank: int, args, port: int, out: str) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(args.ranks),
        LOCAL_RANK=str(rank),
    )
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device == "cuda":
        torch.cuda.set_device(rank)
        device = torch.device("cuda", rank)
    else:
        device = torch.device("cpu")
    dist.init_process_group(
        "nccl" if args.device == "cuda" else "gloo", rank=rank, world_size=args.ranks
    )
    variants = [(2, False), (3, False)] + ([(3, True)] if args.per_module else [])
    runs = [Variant(args, stage, per_module, device) for stage, per_module in variants]
    for run in runs:  # warm-up; ZeRO-3 records its module trace in the first step
        for _ in range(2):
            run.step(record=False)
    for _ in range(args.steps):  # in turns, so that load changes hit every variant alike
        for run in runs:
            run.step()
    rows = [run.row(runs[0]) for run in runs]
    dist.destroy_process_group()
    if rank == 0:
        Path(out).write_text(json.dumps(rows))


def table(rows: list[dict], ranks: int, precision: str) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "| --- |" + " ---: |" * (len(COLUMNS) - 1)]
    for r in rows:
        gathers = "- | -" if r["stage"] != 3 else f"{r['fetches']:.0f} | {r['gathers']:.0f}"
        peak = "-" if math.isnan(r["peak_mb"]) else f"{r['peak_mb']:.0f}"
        lines.append(
            f"| {r['variant']} | {ranks} | {precision} | {r['seconds']:.3f} | {r['ratio']:.2f}x "
            f"| {gathers} | {r['loss']:.6f} | {peak} |"
        )
    return "\n".join(lines)


def step_rows(rows: list[dict], args) -> str:
    """The rows in bench/step.py's table columns (bench/gpu.sh prints one table)."""
    case = f"{args.preset} b{args.batch}" + (
        "" if args.iterations is None else f" T={args.iterations}"
    )
    lines = []
    for r in rows:
        lines.append(
            table_row(
                {
                    "case": case,
                    "model": f"ours {r['variant']}, {args.ranks} rank(s)",
                    "dtype": "bf16p" if args.precision == "bf16" else args.precision,
                    "compile": "off",
                    "recompute": "-",
                    "step s": r["seconds"],
                    "samples/s": args.batch * args.ranks / r["seconds"],
                    "peak MB": r["peak_mb"],
                    "speed-up": 1 / r["ratio"] if r["stage"] != 2 else None,
                    "vs": "ZeRO-2" if r["stage"] != 2 else None,
                }
            )
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--preset", default="demo")
    parser.add_argument("--batch", type=int, default=16, help="micro-batch per rank")
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--iterations", type=int, default=None, help="override T")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="[PRESET.]FIELD=VALUE",
        help="override a CTMConfig field (as bench/step.py --set)",
    )
    parser.add_argument(
        "--steps", type=int, default=5, help="timed steps per variant (after two warm-up steps)"
    )
    parser.add_argument(
        "--precision",
        choices=("fp32", "bf16"),
        default=None,
        help="default: bf16 on CUDA, fp32 on CPU",
    )
    parser.add_argument(
        "--per-module",
        action="store_true",
        help="also time ZeRO-3 with DeepSpeed's default per-module gathering",
    )
    parser.add_argument("--threads", type=int, default=None, help="torch threads per rank")
    parser.add_argument(
        "--step-rows", action="store_true", help="print rows in bench/step.py's table columns"
    )
    args = parser.parse_args(argv)
    args.precision = args.precision or ("bf16" if args.device == "cuda" else "fp32")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "rows.json")
        mp.spawn(_worker, args=(args, port, out), nprocs=args.ranks)
        rows = json.loads(Path(out).read_text())
    if args.step_rows:
        print(step_rows(rows, args))
        return
    print(
        f"{args.preset}, micro-batch {args.batch} per rank, {args.device}, torch {torch.__version__}"
    )
    print(table(rows, args.ranks, args.precision))


if __name__ == "__main__":
    main()
