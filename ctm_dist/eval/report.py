"""An evaluation report on disk: ``report.json``, one PNG per figure, and the same figures and headline
numbers in TensorBoard (``{out}/tensorboard``)."""

from __future__ import annotations

import json
import math
from pathlib import Path

from . import plots


def report_figures(report: dict) -> dict:
    """{name: Figure} for whatever the report holds."""
    figs = {}
    if "classification" in report:
        c = report["classification"]
        figs["accuracy_per_tick"] = plots.accuracy_per_tick(c)
        figs["calibration"] = plots.reliability_diagram(
            c["reliability_most_certain"], c["ece_most_certain"]
        )
        figs["most_certain_tick"] = plots.tick_histogram_from_counts(
            c["most_certain_tick_histogram"], "most certain tick"
        )
    if "halting" in report:
        figs["halting_sweep"] = plots.halting_sweep(report["halting"], report.get("halting_timing"))
    if "mazes" in report:
        figs["maze_accuracy"] = plots.maze_accuracy_per_tick(report["mazes"])
    if "generalisation" in report and report["generalisation"]["mazes"]:
        figs["maze_generalisation"] = plots.generalisation(report["generalisation"])
    if "parity" in report:
        figs["parity_accuracy"] = plots.parity_accuracy(report["parity"])
    return figs


def headline(report: dict) -> dict[str, float]:
    """Scalars worth a TensorBoard line."""
    out = {}
    for section, keys in (
        (
            "classification",
            (
                "most_certain_top1",
                "most_certain_top5",
                "instant_top1",
                "mean_logits_top1",
                "certainty_weighted_top1",
                "ece_most_certain",
            ),
        ),
        ("mazes", ("step_accuracy", "route_accuracy", "solved")),
        ("parity", ("accuracy", "sequence_accuracy")),
        ("qamnist", ("accuracy",)),
        ("rl", ("mean_return", "mean_length")),
        ("generalisation", ("solved",)),
    ):
        for k in keys:
            v = report.get(section, {}).get(k)
            if isinstance(v, (int, float)) and not math.isnan(v):
                out[f"{section}/{k}"] = float(v)
    return out


# The training run's names for the same numbers (``ctm_dist.train``'s ``eval/...`` scalars): written
# under both names, an evaluation's points fall on the training run's curves in TensorBoard.
TRAINING_TAGS = {
    "classification/most_certain_top1": "top1",
    "classification/most_certain_top5": "top5",
    "mazes/step_accuracy": "step_accuracy",
    "mazes/route_accuracy": "route_accuracy",
    "parity/sequence_accuracy": "sequence_accuracy",
}


def write_report(
    report: dict, out_dir: str | Path, step: int = 0, tensorboard: bool = True
) -> list[Path]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "report.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(report, indent=2, default=float) + "\n")
    tmp.replace(path)
    written = [path]
    figs = report_figures(report)
    writer = None
    if tensorboard:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(str(out / "tensorboard"))
    try:
        for name, fig in figs.items():
            if writer is not None:
                writer.add_figure(f"eval/{name}", fig, step, close=False)
            written.append(plots.save(fig, out / f"{name}.png"))
        if writer is not None:
            for k, v in headline(report).items():
                writer.add_scalar(f"eval/{k}", v, step)
                if k in TRAINING_TAGS:
                    writer.add_scalar(f"eval/{TRAINING_TAGS[k]}", v, step)
    finally:
        if writer is not None:
            writer.close()
    return written
