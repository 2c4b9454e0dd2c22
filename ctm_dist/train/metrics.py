"""Training observability: running sums reduced over ranks, TensorBoard on rank 0, one-line logs.

Every rank accumulates metric sums (:class:`ctm_dist.tasks.MetricSums`: loss, samples, the
task's counts, most-certain ticks) and all ranks reduce them together at the same step; rank 0 then writes TensorBoard scalars and
histograms and hands a flat dict to the driver's progress display.
"""

from __future__ import annotations

import os
import resource
import sys
import time
from collections import defaultdict
from urllib.parse import urlsplit, urlunsplit

import torch
import yaml


class StepTimer:
    """Wall time per named phase since the last ``take()``."""

    def __init__(self):
        self.totals: dict[str, float] = defaultdict(float)
        self.started = time.perf_counter()

    def add(self, name: str, seconds: float) -> None:
        self.totals[name] += seconds

    def take(self) -> tuple[dict[str, float], float]:
        now = time.perf_counter()
        totals, elapsed = dict(self.totals), now - self.started
        self.totals.clear()
        self.started = now
        return totals, elapsed


def peak_memory_gib(device: torch.device | None = None) -> float:
    """Peak memory of this process: CUDA's allocator on a GPU device, else the resident set size."""
    if device is not None and device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return rss / (2**30 if sys.platform == "darwin" else 2**20)


def _without_userinfo(value):
    if (
        isinstance(value, str)
        and "://" in value
        and "@" in value.split("://", 1)[1].split("/", 1)[0]
    ):
        parts = urlsplit(value)
        return urlunsplit(parts._replace(netloc=parts.netloc.rsplit("@", 1)[1]))
    return value


def config_text(cfg) -> str:
    """The resolved config as YAML, for files, TensorBoard and ``--print-config``.

    A config holds no keys (those come from the environment or a credentials file); URLs lose any
    ``user:password@`` part all the same.
    """

    def plain(value):
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        return _without_userinfo(value)

    return yaml.safe_dump(plain(cfg.to_dict()), sort_keys=False)


class TensorBoardLog:
    """TensorBoard writer for rank 0; ``sync`` copies the event files to the run's storage."""

    def __init__(self, local_dir: str, start_step: int = 0):
        from torch.utils.tensorboard import SummaryWriter

        os.makedirs(local_dir, exist_ok=True)
        self.local_dir = local_dir
        # purge_step drops events logged after the checkpoint we resumed from (a crash replays them)
        self.writer = SummaryWriter(
            local_dir, purge_step=start_step + 1 if start_step > 0 else None
        )

    def scalars(self, values: dict[str, float], step: int) -> None:
        for name, value in values.items():
            self.writer.add_scalar(name, value, step)

    def text(self, name: str, text: str, step: int = 0) -> None:
        # indented: TensorBoard renders text as Markdown, and a code block keeps the YAML as written
        self.writer.add_text(name, "\n".join("    " + line for line in text.splitlines()), step)

    def histogram(
        self, name: str, values: torch.Tensor, step: int, bins: int | None = None
    ) -> None:
        if values.numel():
            if bins:
                edges = torch.arange(bins + 1, dtype=torch.float64) + 0.5  # integer values 1..bins
                self.writer.add_histogram(name, values.double(), step, bins=edges.numpy())
            else:
                self.writer.add_histogram(name, values.double(), step)

    def flush(self) -> None:
        self.writer.flush()

    def sync(self, location) -> None:
        """Upload the event files to ``location`` (a :class:`ctm_dist.storage.Location`)."""
        self.flush()
        location.put_dir(self.local_dir)

    def close(self) -> None:
        self.writer.close()


def format_line(step: int, max_steps: int, values: dict[str, float]) -> str:
    """One readable log line from a metrics dict."""
    parts = [f"step {step}/{max_steps}"]
    for key, label, fmt in (
        ("train/loss", "loss", "{:.4f}"),
        ("train/accuracy", "acc", "{:.3f}"),
        ("train/most_certain_tick_mean", "tick", "{:.1f}"),
        ("train/lr", "lr", "{:.2e}"),
        ("train/grad_norm", "gnorm", "{:.3f}"),
        ("perf/samples_per_s", "samples/s", "{:.1f}"),
        ("perf/step_time_s", "step", "{:.3f}s"),
        ("perf/data_wait_s", "data", "{:.3f}s"),
        ("perf/peak_memory_gib", "mem", "{:.2f}GiB"),
        ("eval/loss", "val_loss", "{:.4f}"),
        ("eval/top1", "val_top1", "{:.3f}"),
        ("eval/top5", "val_top5", "{:.3f}"),
        ("eval/step_accuracy", "val_step", "{:.3f}"),
        ("eval/route_accuracy", "val_route", "{:.3f}"),
        ("eval/sequence_accuracy", "val_seq", "{:.3f}"),
        ("train/episode_return", "return", "{:.1f}"),
        ("eval/episode_return", "val_return", "{:.1f}"),
        ("checkpoint/save_s", "ckpt", "{:.2f}s"),
    ):
        if key in values and values[key] is not None:
            parts.append(f"{label} " + fmt.format(values[key]))
    return " | ".join(parts)
