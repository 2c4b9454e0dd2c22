"""Command lines behind ``launch/evaluate.py``, ``launch/visualize.py``, ``launch/predict.py`` and ``launch/export.py``."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from .halting import DEFAULT_THRESHOLDS, best_threshold


def _checkpoint_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", help="consolidated export (dir or .safetensors), run URL ({storage}/{run}) "
                                      "or reference checkpoint (.pt); local path or s3://, gs://, file:// URL")
    p.add_argument("--step", type=int, default=None, help="a run's step (default: newest committed)")


# ------------------------------------------------------------------------------------- evaluate

def evaluate_main(argv: list[str] | None = None) -> int:
    from .evaluate import EvalRequest, evaluate, request_dict
    from .report import write_report

    p = argparse.ArgumentParser(description="Evaluate a CTM checkpoint: JSON report, PNG plots, TensorBoard.")
    _checkpoint_args(p)
    p.add_argument("--data", default="", help="shard set URL (not needed for parity)")
    p.add_argument("--split", default="val")
    p.add_argument("--task", default=None, help="imagenet, demo, cifar10, mazes or parity (default: the shard set's)")
    p.add_argument("--out", default="eval-out", help="directory for report.json, PNGs and tensorboard/")
    p.add_argument("--workers", type=int, default=1, help="Ray workers, each evaluating its part (1 = in-process)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--max-batches", type=int, default=0, help="per worker; 0 = whole split")
    p.add_argument("--image-size", type=int, default=None)
    p.add_argument("--iterations", type=int, default=None, help="ticks to run (default: as trained)")
    p.add_argument("--thresholds", type=float, nargs="+", default=list(DEFAULT_THRESHOLDS),
                   help="certainty thresholds of the halting sweep")
    p.add_argument("--timing-batches", type=int, default=4,
                   help="batches for measuring halting wall time (classification; 0 = skip)")
    p.add_argument("--generalise", default="", help="shard set of (larger) mazes for re-application")
    p.add_argument("--generalise-split", default="test")
    p.add_argument("--generalise-mazes", type=int, default=20, help="per worker")
    p.add_argument("--max-reapplications", type=int, default=20)
    p.add_argument("--parity-samples", type=int, default=1024)
    a = p.parse_args(argv)

    req = EvalRequest(checkpoint=a.checkpoint, data=a.data, split=a.split, task=a.task, step=a.step,
                      batch_size=a.batch_size, max_batches=a.max_batches, workers=a.workers,
                      image_size=a.image_size, thresholds=tuple(a.thresholds), iterations=a.iterations,
                      generalise_data=a.generalise, generalise_split=a.generalise_split,
                      generalise_mazes=a.generalise_mazes, max_reapplications=a.max_reapplications,
                      parity_samples=a.parity_samples)
    report = evaluate(req)
    report["request"] = request_dict(req)
    if "halting" in report and a.timing_batches > 0:
        report["halting_timing"] = measure_halting_time(req, a.timing_batches)
    written = write_report(report, a.out, step=report.get("source", {}).get("step") or 0)
    print(format_summary(report))
    print(f"wrote {len(written)} files to {a.out}")
    return 0


def measure_halting_time(req, n_batches: int) -> dict:
    from .halting import time_halting
    from .inputs import shard_samples
    from .loading import load_model

    overrides = {"iterations": req.iterations} if req.iterations else {}
    model = load_model(req.checkpoint, step=req.step, **overrides).model.eval()
    x, _, _ = shard_samples(req.data, req.split, n_batches * req.batch_size, task=req.task,
                            image_size=req.image_size)
    batches = list(x.float().split(req.batch_size))
    return time_halting(model, batches, req.thresholds, repeats=2)


def format_summary(report: dict) -> str:
    lines = [f"task {report['task']} ({report['checkpoint_kind']} {report.get('source', {})})"]
    c = report.get("classification")
    if c:
        lines.append(f"samples {c['samples']}  top-1 most certain {100 * c['most_certain_top1']:.2f}%  "
                     f"top-5 {100 * c['most_certain_top5']:.2f}%  last tick {100 * c['instant_top1']:.2f}%  "
                     f"mean logits {100 * c['mean_logits_top1']:.2f}%  certainty-weighted "
                     f"{100 * c['certainty_weighted_top1']:.2f}%  ECE {c['ece_most_certain']:.4f}")
    h = report.get("halting")
    if h:
        timing = {r["threshold"]: r for r in report.get("halting_timing", {}).get("per_threshold", [])}
        lines.append("threshold  top-1    drop(pt)  mean ticks  tick saving  wall saving  (after backbone)  "
                     "cpu saving  (after backbone)")
        for r in h["sweep"]:
            t = timing.get(r["threshold"])
            cols = [f"{100 * t[k]:.1f}%" if t else "-" for k in
                    ("saving", "tick_loop_saving", "cpu_saving", "cpu_tick_loop_saving")]
            lines.append(f"{r['threshold']:<9g}  {100 * r['top1']:6.2f}%  {r['top1_drop_points']:7.2f}  "
                         f"{r['mean_ticks']:10.2f}  {100 * r['tick_saving']:10.1f}%  {cols[0]:>11}  {cols[1]:>16}  "
                         f"{cols[2]:>10}  {cols[3]:>16}")
        if report.get("halting_timing"):
            ht = report["halting_timing"]
            lines.append(f"full run {ht['full_s']:.3f} s wall / {ht['full_cpu_s']:.3f} s cpu, of which before the "
                         f"first tick (backbone) {ht['start_s']:.3f} s / {ht['start_cpu_s']:.3f} s")
        best = best_threshold(h)
        if best:
            lines.append(f"best within 1 point: threshold {best['threshold']:g}, "
                         f"{100 * best['tick_saving']:.1f}% fewer ticks, top-1 drop {best['top1_drop_points']:.2f} pt")
    m = report.get("mazes")
    if m:
        lines.append(f"mazes {m['samples']}: step accuracy {100 * m['step_accuracy']:.2f}%  route accuracy "
                     f"{100 * m['route_accuracy']:.2f}%  solved {100 * m['solved']:.2f}%")
    g = report.get("generalisation")
    if g:
        lines.append(f"generalisation: {g['mazes']} mazes, solved {100 * g['solved']:.1f}%")
    par = report.get("parity")
    if par:
        lines.append(f"parity {par['samples']}: accuracy {100 * par['accuracy']:.2f}%  "
                     f"sequences {100 * par['sequence_accuracy']:.2f}%")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------- pictures

def _inputs(a, loaded, count: int):
    """(x, targets or None, task, names) from --images or --data."""
    from .inputs import image_files, shard_samples

    task = a.task or loaded.task
    if a.images:
        if not task:
            raise SystemExit("--task is needed with --images (the checkpoint does not say)")
        size = a.image_size or int((loaded.meta or {}).get("image_size") or (32 if task in ("demo", "cifar10") else 224))
        return image_files(a.images, task, size), None, task, list(a.images)
    if not a.data:
        raise SystemExit("give --images FILE... or --data SHARD_SET_URL")
    route_length = loaded.cfg.out_dims // 5 if task == "mazes" else None
    x, y, task = shard_samples(a.data, a.split, count, task=task, image_size=a.image_size, route_length=route_length)
    return x, y, task, [f"{a.split}[{i}]" for i in range(len(x))]


def visualize_main(argv: list[str] | None = None) -> int:
    from .loading import load_model
    from .pictures import make_pictures

    p = argparse.ArgumentParser(description="Pictures of a CTM on a few inputs (PNG and GIF).")
    _checkpoint_args(p)
    p.add_argument("--images", nargs="*", default=[], help="image files")
    p.add_argument("--data", default="", help="shard set URL (first --count samples of --split)")
    p.add_argument("--split", default="val")
    p.add_argument("--count", type=int, default=16, help="inputs in the batch")
    p.add_argument("--per-input", type=int, default=4, help="inputs that get attention/neuron/maze pictures")
    p.add_argument("--task", default=None)
    p.add_argument("--image-size", type=int, default=None)
    p.add_argument("--threshold", type=float, default=0.8, help="certainty threshold for the ticks-used histogram")
    p.add_argument("--out", default="pictures")
    p.add_argument("--tensorboard", action="store_true", help="also write the figures to {out}/tensorboard")
    a = p.parse_args(argv)

    loaded = load_model(a.checkpoint, step=a.step)
    x, y, task, _ = _inputs(a, loaded, a.count)
    tb = None
    if a.tensorboard:
        from torch.utils.tensorboard import SummaryWriter

        tb = SummaryWriter(str(Path(a.out) / "tensorboard"))
    try:
        written = make_pictures(loaded.model, x, task, a.out, targets=y, threshold=a.threshold,
                                per_input=a.per_input, tb=tb)
    finally:
        if tb is not None:
            tb.close()
    for path in written:
        print(path)
    return 0


# ------------------------------------------------------------------------------------- predict

def predict_main(argv: list[str] | None = None) -> int:
    from .loading import load_model
    from .pictures import summary_lines

    p = argparse.ArgumentParser(description="Classify image files with adaptive halting: class, tick, certainty.")
    _checkpoint_args(p)
    p.add_argument("images", nargs="+")
    p.add_argument("--threshold", type=float, default=0.8, help="stop once certainty reaches this")
    p.add_argument("--task", default=None, help="input transform (default: the checkpoint's task, else imagenet)")
    p.add_argument("--image-size", type=int, default=None)
    a = p.parse_args(argv)

    loaded = load_model(a.checkpoint, step=a.step)
    a.task = a.task or loaded.task or "imagenet"
    a.data = ""
    x, _, _, names = _inputs(a, loaded, len(a.images))
    with torch.inference_mode():
        for line in summary_lines(loaded.model, x, a.threshold, names, loaded.meta):
            print(line)
    return 0


# ------------------------------------------------------------------------------------- export

def export_main(argv: list[str] | None = None) -> int:
    from .export import export_run

    p = argparse.ArgumentParser(description="Export a run's ZeRO checkpoint to one safetensors file + JSON config "
                                            "(or to the reference's .pt format).")
    p.add_argument("run", help="run URL: {storage}/{run_name}")
    p.add_argument("out", help="output directory (or .pt file with --reference-dataset); path or URL")
    p.add_argument("--step", type=int, default=None)
    p.add_argument("--reference-dataset", default=None,
                   help="write the reference's checkpoint format for this dataset (cifar10, imagenet, mazes-medium, parity...)")
    a = p.parse_args(argv)
    where = export_run(a.run, a.out, step=a.step, reference_dataset=a.reference_dataset)
    print(json.dumps({"exported": where}))
    return 0


if __name__ == "__main__":
    sys.exit(evaluate_main())
