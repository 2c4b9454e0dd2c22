"""Adaptive compute on the demo model: accuracy vs ticks used over certainty thresholds, and wall time.

    python bench/halting.py --out bench-out/halting            # trains a demo CTM in-process first
    python bench/halting.py --checkpoint EXPORT_OR_RUN --data URL

Without --checkpoint it writes the demo shard set, trains ``preset("demo")`` for --train-minutes in
this process (no Ray, no DeepSpeed) with the certainty loss, and exports it (safetensors) under --out.
Then it evaluates the validation split (report.json, plots) and measures wall time of full runs
against ``ctm_dist.inference.predict`` (finished samples leave the batch) at each threshold.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import torch  # noqa: E402

from ctm_dist.data.demo_writer import write_demo_shards  # noqa: E402
from ctm_dist.data.reader import ShardLoader  # noqa: E402
from ctm_dist.eval.cli import format_summary  # noqa: E402
from ctm_dist.eval.evaluate import EvalRequest, evaluate  # noqa: E402
from ctm_dist.eval.export import save_consolidated  # noqa: E402
from ctm_dist.eval.halting import time_halting  # noqa: E402
from ctm_dist.eval.inputs import shard_samples  # noqa: E402
from ctm_dist.eval.loading import load_model  # noqa: E402
from ctm_dist.eval.report import write_report  # noqa: E402
from ctm_dist.losses import image_classification_loss  # noqa: E402
from ctm_dist.model import CTM, preset  # noqa: E402


def train_demo(
    data: str, minutes: float, batch_size: int, seed: int = 0, lr: float = 1e-3, on_save=None
):
    torch.manual_seed(seed)
    model = CTM(preset("demo")).train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    loader = ShardLoader(data, "train", batch_size=batch_size, train=True, seed=seed)
    deadline = time.monotonic() + 60 * minutes
    step, epoch = 0, 0
    while time.monotonic() < deadline:
        for batch in loader:
            predictions, certainties, _ = model(batch["input"])
            loss, _ = image_classification_loss(
                predictions, certainties, batch["target"], weight=batch["valid"].float()
            )
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            if step % 20 == 0:
                print(f"step {step} epoch {epoch} loss {loss.item():.3f}", flush=True)
            if on_save is not None and step % 50 == 0:
                on_save(model, step)
            if time.monotonic() >= deadline:
                break
        epoch += 1
    return model.eval(), step


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--checkpoint", default="")
    p.add_argument("--data", default="")
    p.add_argument("--out", default="bench-out/halting")
    p.add_argument("--train-minutes", type=float, default=8.0)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (1 is fastest on a busy 2-core machine)",
    )
    p.add_argument("--timing-batches", type=int, default=6)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument(
        "--thresholds", type=float, nargs="+", default=None, help="default: the evaluation's"
    )
    a = p.parse_args()
    torch.set_num_threads(a.threads)

    os.makedirs(a.out, exist_ok=True)
    data = a.data or os.path.join(os.path.abspath(a.out), "demo-shards")
    if not a.data and not os.path.exists(os.path.join(data, "val.json")):
        write_demo_shards(data)
    checkpoint = a.checkpoint
    if not checkpoint:
        checkpoint = os.path.join(os.path.abspath(a.out), "demo-export")

        def save(model, steps):
            save_consolidated(
                model,
                checkpoint,
                task="demo",
                meta={
                    "classes": [str(d) for d in range(10)],
                    "image_size": 32,
                    "train_steps": steps,
                },
            )

        model, steps = train_demo(data, a.train_minutes, a.batch_size, lr=a.lr, on_save=save)
        save(model.eval(), steps)
    req = EvalRequest(checkpoint=checkpoint, data=data, split="val", batch_size=a.batch_size)
    if a.thresholds:
        req.thresholds = tuple(a.thresholds)
    report = evaluate(req)
    model = load_model(checkpoint).model.eval()
    x, _, _ = shard_samples(data, "val", a.timing_batches * a.batch_size)
    report["halting_timing"] = time_halting(
        model, list(x.split(a.batch_size)), req.thresholds, repeats=a.repeats
    )
    write_report(report, a.out)
    print(format_summary(report))
    print(json.dumps({"full_s": report["halting_timing"]["full_s"]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
