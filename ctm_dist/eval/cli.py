"""Command lines behind ``launch/evaluate.py``, ``launch/visualize.py``, ``launch/predict.py`` and ``launch/export.py``.

Exit codes: 0 done, 2 bad input (one ``error:`` line on stderr: a missing or unreadable checkpoint,
an unsafe pickle, a file that is no image, an out-of-range value). A run in the trainer's embedded
object store (``s3://ctm-dist/...``, no ``AWS_ENDPOINT_URL`` set, ``./.ctm-dist`` present, or
``--local-dir DIR``) is read by starting that store for the command's duration, so the commands
the trainer prints at the end (``ctm_dist.eval.commands.next_commands``) work as printed.

``report`` and ``pictures`` (matplotlib, TensorBoard) are imported inside the commands that draw,
so that ``--help`` stays fast.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import io
import json
import os
import pickle
import sys
import zipfile
from pathlib import Path

import torch

from ctm_dist.model import kind_of
from ctm_dist.storage import Location, StorageError
from ctm_dist.storage.checkpoints import CheckpointError
from ctm_dist.storage.local import EMBEDDED_BUCKET, EMBEDDED_LOCAL_DIR, embedded_store, environ
from ctm_dist.tasks import PictureRequest, get_task
from ctm_dist.tasks.classification import DEFAULT_THRESHOLDS

from .evaluate import EvalRequest, evaluate, request_dict
from .export import MODEL_FILE, export_run
from .halting import best_threshold, time_halting
from .inputs import image_files, input_spec, shard_samples
from .loading import load_model

# Errors that mean bad input rather than a bug: reported in one line, exit 2.
INPUT_ERRORS = (
    ValueError,
    OSError,
    StorageError,
    pickle.UnpicklingError,
    EOFError,
    zipfile.BadZipFile,
)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, exit 2 (as the trainer's)
        print(f"error: {message}", file=sys.stderr)
        raise SystemExit(2)


def _ranged(kind, low=None, high=None, what: str = "value"):
    """An argparse type: ``kind`` within [low, high]."""

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a {kind.__name__}") from None
        if (low is not None and value < low) or (high is not None and value > high):
            bounds = f">= {low}" if high is None else f"in [{low}, {high}]"
            raise argparse.ArgumentTypeError(f"{what} must be {bounds}, got {text}")
        return value

    return parse


CERTAINTY = _ranged(float, 0.0, 1.0, "a certainty threshold")
SWEEP_THRESHOLD = _ranged(float, 0.0, 2.0, "a sweep threshold (above 1: never stops early)")
POSITIVE = _ranged(int, 1, None, "the value")
NON_NEGATIVE = _ranged(int, 0, None, "the value")


def _one_line(error: BaseException) -> str:
    text = next((line.strip() for line in str(error).splitlines() if line.strip()), "")
    if isinstance(error, FileNotFoundError) and error.filename and error.filename not in text:
        text = f"{error.filename}: {text or 'not found'}"
    if type(error).__name__ == "NoCredentialsError":  # botocore's, for an s3:// URL
        text += " for S3 (set AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY and AWS_ENDPOINT_URL, or --local-dir)"
    return text or type(error).__name__


def _storage_client_errors() -> tuple:
    try:
        from botocore.exceptions import BotoCoreError, ClientError
    except ImportError:
        return ()
    return (BotoCoreError, ClientError)


def command(main):
    """Run a ``*_main``: bad input ends in one ``error:`` line and exit 2, never a traceback."""

    @functools.wraps(main)
    def wrapped(argv: list[str] | None = None) -> int:
        try:
            return main(argv)
        except CheckpointError as e:  # names the file inside the checkpoint; say which checkpoint
            given = next(
                (a for a in (sys.argv[1:] if argv is None else argv) if not a.startswith("-")), ""
            )
            print(f"error: {given}: {_one_line(e)}", file=sys.stderr)
            return 2
        except INPUT_ERRORS + _storage_client_errors() as e:
            print(f"error: {_one_line(e)}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            return 130

    return wrapped


def _checkpoint_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "checkpoint",
        help="consolidated export (dir or .safetensors), run URL ({storage}/{run}) "
        "or reference checkpoint (.pt); local path or s3://, gs://, file:// URL; or the reference's "
        "Hugging Face layout (config.json + model.safetensors): its directory, or a Hub id "
        "(owner/name or hf://owner/name)",
    )
    p.add_argument(
        "--step", type=NON_NEGATIVE, default=None, help="a run's step (default: newest committed)"
    )
    _local_dir_arg(p)


def _local_dir_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--local-dir",
        default=None,
        help=f"training's local directory whose embedded object store holds the run (started for this "
        f"command); default: {EMBEDDED_LOCAL_DIR} when a URL is under s3://{EMBEDDED_BUCKET}/ and "
        "AWS_ENDPOINT_URL is not set",
    )


# ------------------------------------------------------------------------------------- the embedded store


def _in_embedded_bucket(url: str | None) -> bool:
    return bool(url) and str(url).startswith(f"s3://{EMBEDDED_BUCKET}/")


@contextlib.contextmanager
def embedded_store_for(urls: list[str | None], local_dir: str | None = None):
    """Start the embedded run store of ``local_dir`` for the block, its endpoint and fresh keys in the
    environment (as the trainer does); without ``local_dir``, only when a URL is in its bucket, no
    endpoint is configured and ``./.ctm-dist`` holds a store. Yields the store or None."""
    if local_dir is None:
        default = Path(EMBEDDED_LOCAL_DIR, "object-store")
        if os.environ.get("AWS_ENDPOINT_URL") or not any(_in_embedded_bucket(u) for u in urls):
            yield None
            return
        if not default.is_dir():
            raise FileNotFoundError(
                f"{next(u for u in urls if _in_embedded_bucket(u))} is in the embedded store of a "
                f"training run, and there is no {default} here: run from the directory you "
                "trained in, or pass --local-dir DIR (or AWS_ENDPOINT_URL and keys)"
            )
        local_dir = EMBEDDED_LOCAL_DIR
    elif not Path(local_dir, "object-store").is_dir():
        raise FileNotFoundError(
            f"--local-dir {local_dir}: no embedded object store ({local_dir}/object-store)"
        )
    with embedded_store(local_dir) as store, environ(store.env()):
        yield store


def _recorded_data(checkpoint: str) -> str | None:
    """The training shard set a local export names (``source.data`` of its config.json), if any."""
    path = Path(checkpoint)
    path = path if path.is_dir() else path.parent
    try:
        return json.loads((path / "config.json").read_text()).get("source", {}).get("data")
    except (OSError, ValueError, AttributeError):
        return None


def _quiet():
    """DeepSpeed prints its progress merging ZeRO shards ("Processing zero checkpoint ..."): away with it."""
    return contextlib.redirect_stdout(io.StringIO())


def _load(checkpoint: str, step: int | None, **overrides):
    """``load_model`` without DeepSpeed's prints."""
    with _quiet():
        return load_model(checkpoint, step=step, **overrides)


def _need_ticks(loaded, tool: str) -> None:
    """A one-line error for a tool that follows a model's ticks, given the feed-forward baseline."""
    if kind_of(loaded.cfg) == "ff":
        raise ValueError(
            f"{tool} follows a model's internal ticks; the feed-forward baseline (model.kind=ff) "
            "has none (evaluate and export take it)"
        )


# ------------------------------------------------------------------------------------- evaluate


@command
def evaluate_main(argv: list[str] | None = None) -> int:
    from .report import write_report

    p = _Parser(description="Evaluate a CTM checkpoint: JSON report, PNG plots, TensorBoard.")
    _checkpoint_args(p)
    p.add_argument(
        "--data",
        default="",
        help="shard set URL (default: the one a run or its export trained on; none for parity, "
        "sort and rl)",
    )
    p.add_argument("--split", default="val")
    p.add_argument(
        "--task",
        default=None,
        help="imagenet, demo, cifar10, mazes, parity, sort, qamnist or rl "
        "(default: the checkpoint's, else the shard set's)",
    )
    p.add_argument(
        "--out", default="eval-out", help="directory for report.json, PNGs and tensorboard/"
    )
    p.add_argument(
        "--workers",
        type=POSITIVE,
        default=1,
        help="Ray workers, each evaluating its part (1 = in-process)",
    )
    p.add_argument("--batch-size", type=POSITIVE, default=64)
    p.add_argument(
        "--max-batches", type=NON_NEGATIVE, default=0, help="per worker; 0 = whole split"
    )
    p.add_argument(
        "--image-size",
        type=POSITIVE,
        default=None,
        help="default: the size the model was trained at",
    )
    p.add_argument(
        "--iterations", type=POSITIVE, default=None, help="ticks to run (default: as trained)"
    )
    p.add_argument(
        "--thresholds",
        type=SWEEP_THRESHOLD,
        nargs="+",
        default=list(DEFAULT_THRESHOLDS),
        help="certainty thresholds of the halting sweep (above 1: the full run)",
    )
    p.add_argument(
        "--timing-batches",
        type=NON_NEGATIVE,
        default=4,
        help="batches for measuring halting wall time (classification; 0 = skip)",
    )
    p.add_argument(
        "--generalise", default="", help="shard set of (larger) mazes for re-application"
    )
    p.add_argument("--generalise-split", default="test")
    p.add_argument("--generalise-mazes", type=POSITIVE, default=20, help="per worker")
    p.add_argument("--max-reapplications", type=POSITIVE, default=20)
    p.add_argument("--parity-samples", type=POSITIVE, default=1024)
    p.add_argument(
        "--qamnist-questions",
        type=POSITIVE,
        default=1024,
        help="Q&A MNIST: questions asked about the digits of --split",
    )
    p.add_argument(
        "--episodes",
        type=POSITIVE,
        default=16,
        help="rl: episodes played with the greedy policy in the run's environment",
    )
    a = p.parse_args(argv)

    req = EvalRequest(
        checkpoint=a.checkpoint,
        data=a.data,
        split=a.split,
        task=a.task,
        step=a.step,
        batch_size=a.batch_size,
        max_batches=a.max_batches,
        workers=a.workers,
        image_size=a.image_size,
        thresholds=tuple(a.thresholds),
        iterations=a.iterations,
        generalise_data=a.generalise,
        generalise_split=a.generalise_split,
        generalise_mazes=a.generalise_mazes,
        max_reapplications=a.max_reapplications,
        parity_samples=a.parity_samples,
        qamnist_questions=a.qamnist_questions,
        episodes=a.episodes,
    )
    with (
        embedded_store_for(
            [a.checkpoint, a.data or _recorded_data(a.checkpoint), a.generalise], a.local_dir
        ),
        _quiet(),
    ):
        report = evaluate(req)
        report["request"] = request_dict(req)
        if "halting" in report and a.timing_batches > 0:
            report["halting_timing"] = measure_halting_time(req, a.timing_batches, report)
    written = write_report(report, a.out, step=report.get("source", {}).get("step") or 0)
    print(format_summary(report))
    print(f"wrote {len(written)} files to {a.out}")
    return 0


def measure_halting_time(req, n_batches: int, report: dict | None = None) -> dict:
    """Wall and CPU time of halting on the first batches of the data ``report`` was computed on."""
    report = report or {}
    overrides = {"iterations": req.iterations} if req.iterations else {}
    model = _load(req.checkpoint, req.step, **overrides).model.eval()
    x, _, _ = shard_samples(
        report.get("data") or req.data,
        req.split,
        n_batches * req.batch_size,
        task=report.get("task") or req.task,
        image_size=report.get("image_size") or req.image_size,
    )
    batches = list(x.float().split(req.batch_size))
    return time_halting(model, batches, req.thresholds, repeats=2)


def format_summary(report: dict) -> str:
    lines = [f"task {report['task']} ({report['checkpoint_kind']} {report.get('source', {})})"]
    c = report.get("classification")
    if c:
        lines.append(
            f"samples {c['samples']}  top-1 most certain {100 * c['most_certain_top1']:.2f}%  "
            f"top-5 {100 * c['most_certain_top5']:.2f}%  last tick {100 * c['instant_top1']:.2f}%  "
            f"mean logits {100 * c['mean_logits_top1']:.2f}%  certainty-weighted "
            f"{100 * c['certainty_weighted_top1']:.2f}%  ECE {c['ece_most_certain']:.4f}"
        )
    h = report.get("halting")
    if h:
        timing = {
            r["threshold"]: r for r in report.get("halting_timing", {}).get("per_threshold", [])
        }
        lines.append(
            "threshold  top-1    drop(pt)  mean ticks  tick saving  wall saving  (after backbone)  "
            "cpu saving  (after backbone)"
        )
        for r in h["sweep"]:
            t = timing.get(r["threshold"])
            cols = [
                f"{100 * t[k]:.1f}%" if t else "-"
                for k in ("saving", "tick_loop_saving", "cpu_saving", "cpu_tick_loop_saving")
            ]
            lines.append(
                f"{r['threshold']:<9g}  {100 * r['top1']:6.2f}%  {r['top1_drop_points']:7.2f}  "
                f"{r['mean_ticks']:10.2f}  {100 * r['tick_saving']:10.1f}%  {cols[0]:>11}  {cols[1]:>16}  "
                f"{cols[2]:>10}  {cols[3]:>16}"
            )
        if report.get("halting_timing"):
            ht = report["halting_timing"]
            lines.append(
                f"full run {ht['full_s']:.3f} s wall / {ht['full_cpu_s']:.3f} s cpu, of which before the "
                f"first tick (backbone) {ht['start_s']:.3f} s / {ht['start_cpu_s']:.3f} s"
            )
        best = best_threshold(h)
        if best:
            lines.append(
                f"best within 1 point: threshold {best['threshold']:g}, "
                f"{100 * best['tick_saving']:.1f}% fewer ticks, top-1 drop {best['top1_drop_points']:.2f} pt"
            )
    m = report.get("mazes")
    if m:
        lines.append(
            f"mazes {m['samples']}: step accuracy {100 * m['step_accuracy']:.2f}%  route accuracy "
            f"{100 * m['route_accuracy']:.2f}%  solved {100 * m['solved']:.2f}%"
        )
    g = report.get("generalisation")
    if g:
        lines.append(f"generalisation: {g['mazes']} mazes, solved {100 * g['solved']:.1f}%")
    par = report.get("parity")
    if par:
        lines.append(
            f"parity {par['samples']}: accuracy {100 * par['accuracy']:.2f}%  "
            f"sequences {100 * par['sequence_accuracy']:.2f}%"
        )
    order = report.get("sort")
    if order:
        lines.append(
            f"sort {order['samples']}: accuracy per position {100 * order['accuracy']:.2f}% "
            f"(chance {100 * order['chance_accuracy']:.1f}%)  "
            f"sequences {100 * order['sequence_accuracy']:.2f}%"
        )
    q = report.get("qamnist")
    if q:
        by_ops = "  ".join(
            f"{n} ops {100 * acc:.2f}%" for n, acc in q["accuracy_by_operations"].items()
        )
        lines.append(
            f"qamnist {q['samples']}: answer accuracy {100 * q['accuracy']:.2f}%  {by_ops}"
        )
    rl = report.get("rl")
    if rl:
        lines.append(
            f"rl {rl['env_id']}, {rl['episodes']} episodes, {rl['policy']} policy: mean return "
            f"{rl['mean_return']:.2f} (std {rl['std_return']:.2f})  mean length "
            f"{rl['mean_length']:.1f}"
        )
    return "\n".join(lines)


# ------------------------------------------------------------------------------------- pictures


def _inputs(a, loaded, count: int):
    """(x, targets or None, task, names) from --images or --data (default: the shard set it trained on),
    through the input pipeline the model was trained with."""
    task = a.task or loaded.task
    if a.images:
        if not task:
            raise ValueError("--task is needed with --images (the checkpoint does not say)")
        spec = input_spec(loaded, task, a.image_size)
        if spec is None:
            raise ValueError(f"task {task!r} takes no images")
        return image_files(a.images, spec), None, task, list(a.images)
    data = a.data or (loaded.source or {}).get("data")
    if not data:
        raise ValueError(
            "give --images FILE... or --data SHARD_SET_URL (the checkpoint records no training data)"
        )
    spec = input_spec(loaded, task, a.image_size) if task else None
    route_length = get_task(task).target_length(loaded.cfg) if task else None
    x, y, task = shard_samples(
        data,
        a.split,
        count,
        task=task,
        image_size=spec.image_size if spec else a.image_size,
        route_length=route_length,
    )
    return x, y, task, [f"{a.split}[{i}]" for i in range(len(x))]


def _task_charts(a, loaded):
    """The task's own pictures (``Task.picture_charts``), or None for the shared ones."""
    name = a.task or loaded.task
    if not name:
        return None
    data = a.data or (loaded.source or {}).get("data")
    spec = input_spec(loaded, name, a.image_size)
    request = PictureRequest(
        split=a.split,
        count=a.count,
        per_input=a.per_input,
        seed=a.seed,
        image_size=spec.image_size if spec else a.image_size,
    )
    with torch.no_grad():
        charts = get_task(name).picture_charts(
            loaded.model.eval(), loaded.meta, Location.parse(data) if data else None, request
        )
    if charts is not None and a.images:
        raise ValueError(f"task {name!r} draws its pictures from its own inputs: no --images")
    return charts


@command
def visualize_main(argv: list[str] | None = None) -> int:
    from .pictures import make_pictures, write_charts

    p = _Parser(description="Pictures of a CTM on a few inputs (PNG and GIF).")
    _checkpoint_args(p)
    p.add_argument("--images", nargs="*", default=[], help="image files")
    p.add_argument(
        "--data",
        default="",
        help="shard set URL (first --count samples of --split; default: the one "
        "the model trained on)",
    )
    p.add_argument("--split", default="val")
    p.add_argument(
        "--count",
        type=POSITIVE,
        default=16,
        help="inputs in the batch (Q&A MNIST: questions; rl: episodes)",
    )
    p.add_argument(
        "--seed",
        type=NON_NEGATIVE,
        default=0,
        help="seed of the questions (Q&A MNIST) or the episodes (rl)",
    )
    p.add_argument(
        "--per-input",
        type=NON_NEGATIVE,
        default=4,
        help="inputs that get attention/neuron/maze pictures",
    )
    p.add_argument("--task", default=None)
    p.add_argument(
        "--image-size",
        type=POSITIVE,
        default=None,
        help="default: the size the model was trained at",
    )
    p.add_argument(
        "--threshold",
        type=CERTAINTY,
        default=0.8,
        help="certainty threshold for the ticks-used histogram",
    )
    p.add_argument("--out", default="pictures")
    p.add_argument(
        "--tensorboard", action="store_true", help="also write the figures to {out}/tensorboard"
    )
    a = p.parse_args(argv)

    with embedded_store_for([a.checkpoint, a.data or _recorded_data(a.checkpoint)], a.local_dir):
        loaded = _load(a.checkpoint, a.step)
        charts = _task_charts(a, loaded)
        if charts is None:
            _need_ticks(loaded, "visualize")
            x, y, task, _ = _inputs(a, loaded, a.count)
    tb = None
    if a.tensorboard:
        from torch.utils.tensorboard import SummaryWriter

        tb = SummaryWriter(str(Path(a.out) / "tensorboard"))
    try:
        if charts is not None:
            written = write_charts(charts, a.out, tb=tb)
        else:
            written = make_pictures(
                loaded.model,
                x,
                task,
                a.out,
                targets=y,
                threshold=a.threshold,
                per_input=a.per_input,
                tb=tb,
                meta=loaded.meta,
            )
    finally:
        if tb is not None:
            tb.close()
    for path in written:
        print(path)
    return 0


# ------------------------------------------------------------------------------------- predict


@command
def predict_main(argv: list[str] | None = None) -> int:
    from .pictures import summary_lines

    p = _Parser(description="Classify image files with adaptive halting: class, tick, certainty.")
    _checkpoint_args(p)
    p.add_argument("images", nargs="+")
    p.add_argument(
        "--threshold", type=CERTAINTY, default=0.8, help="stop once certainty (0..1) reaches this"
    )
    p.add_argument(
        "--task",
        default=None,
        help="input transform (default: the checkpoint's task, else imagenet)",
    )
    p.add_argument(
        "--image-size",
        type=POSITIVE,
        default=None,
        help="default: the size the model was trained at",
    )
    a = p.parse_args(argv)

    with embedded_store_for([a.checkpoint], a.local_dir):
        loaded = _load(a.checkpoint, a.step)
    _need_ticks(loaded, "predict (adaptive halting)")
    a.task = a.task or loaded.task or "imagenet"
    a.data = ""
    x, _, _, names = _inputs(a, loaded, len(a.images))
    with torch.inference_mode():
        for line in summary_lines(loaded.model, x, a.threshold, names, loaded.meta):
            print(line)
    return 0


# ------------------------------------------------------------------------------------- export


@command
def export_main(argv: list[str] | None = None) -> int:
    p = _Parser(
        description="Export a run's ZeRO checkpoint to one safetensors file + JSON config "
        "(or to the reference's .pt format)."
    )
    p.add_argument("run", help="run URL: {storage}/{run_name}")
    p.add_argument(
        "out",
        help="output directory (or .pt file with --reference-dataset or --reference); path or URL",
    )
    p.add_argument("--step", type=NON_NEGATIVE, default=None)
    p.add_argument(
        "--reference-dataset",
        default=None,
        help="write the reference's checkpoint format for this dataset (cifar10, imagenet, "
        "mazes-medium, parity, qamnist, an RL environment id such as CartPole-v1...)",
    )
    p.add_argument(
        "--reference",
        action="store_true",
        help="write the reference's checkpoint format for the dataset the run tells "
        "(qamnist runs: qamnist; rl runs: their environment)",
    )
    _local_dir_arg(p)
    a = p.parse_args(argv)
    with embedded_store_for([a.run, a.out], a.local_dir):
        if Location.parse(a.run).exists(MODEL_FILE):
            raise ValueError(
                f"{a.run} is already an export ({MODEL_FILE}); export takes a run URL ({{storage}}/{{run}})"
            )
        with _quiet():
            where = export_run(
                a.run,
                a.out,
                step=a.step,
                reference_dataset=a.reference_dataset,
                reference=a.reference,
            )
    print(json.dumps({"exported": where}))
    return 0


if __name__ == "__main__":
    sys.exit(evaluate_main())
