"""Classification (imagenet, cifar10, demo): certainty loss, accuracy at the most-certain tick,
and offline the readouts, calibration and the halting sweep.

Offline, the CTM's answer at every tick t can be read four ways, each using only ticks 0..t:
``instant`` (the logits of tick t), ``most_certain`` (the tick of highest certainty so far),
``mean_logits`` (logits averaged over ticks) and ``certainty_weighted`` (logits weighted by
certainty). Each is scored top-1 and top-5. The numbers training also reports (top-1 and top-5
at the most-certain tick, top-1 per tick) are counted by the training's own ``accumulate``; every
accuracy, online or offline, is a ``ctm_dist.losses`` metric. Calibration is the expected
calibration error of the softmax confidence at each tick and at the most-certain tick. The
halting sweep scores adaptive compute: a sample halts at the first tick whose certainty reaches
the threshold (or at the last tick), the rule ``ctm_dist.inference.predict`` follows.
"""

from __future__ import annotations

import numpy as np
import torch

from ctm_dist.data import transforms as T
from ctm_dist.data.decode import BadSample, ClassificationDecoder, make_decoder
from ctm_dist.losses import (
    accuracy_at_most_certain,
    image_classification_loss,
    most_certain_tick,
    per_tick_accuracy,
    per_tick_cross_entropy,
    topk_accuracy,
    topk_correct,
)
from ctm_dist.model import kind_of

from .base import ShardTask
from .sums import Measure

READOUTS = ("instant", "most_certain", "mean_logits", "certainty_weighted")
TOPK = (1, 5)


def readout_logits(predictions: torch.Tensor, certainties: torch.Tensor) -> dict[str, torch.Tensor]:
    """Logits [B, C, T] for each readout, where column t uses ticks 0..t only."""
    B, C, T = predictions.shape
    ticks = torch.arange(1, T + 1, device=predictions.device, dtype=predictions.dtype)
    cumsum = predictions.cumsum(-1)
    certainty = certainties[:, 1, :].to(predictions.dtype)  # [B, T]
    weighted = (predictions * certainty[:, None, :]).cumsum(-1)
    running_best = most_certain_tick(certainties, running=True)  # [B, T]: within ticks 0..t
    most_certain = torch.gather(predictions, 2, running_best[:, None, :].expand(B, C, T))
    return {
        "instant": predictions,
        "most_certain": most_certain,
        "mean_logits": cumsum / ticks,
        "certainty_weighted": weighted,
    }


def calibration_bins(confidence: torch.Tensor, correct: torch.Tensor, n_bins: int) -> np.ndarray:
    """[n_bins, 3] rows of (count, sum of confidence, sum of correct) for one tick."""
    idx = (confidence.clamp(0, 1) * n_bins).long().clamp(max=n_bins - 1)
    out = torch.zeros(n_bins, 3, dtype=torch.float64)
    out[:, 0].index_add_(0, idx, torch.ones_like(confidence, dtype=torch.float64))
    out[:, 1].index_add_(0, idx, confidence.double())
    out[:, 2].index_add_(0, idx, correct.double())
    return out.numpy()


def expected_calibration_error(bins: np.ndarray) -> float:
    """ECE from [n_bins, 3] (count, sum confidence, sum correct) rows."""
    total = bins[:, 0].sum()
    if total == 0:
        return float("nan")
    return float(np.abs(bins[:, 1] - bins[:, 2]).sum() / total)


class ClassificationStats(Measure):
    """Readout accuracies, loss, certainty and calibration per tick, as sums.

    ``Classification.accumulate`` adds the sums training has ("correct" and "top5" at the
    most-certain tick, "per_tick_correct": the instant readout's top-1); the other readouts are
    counted with the same ``per_tick_accuracy``.
    """

    shape = ("ticks", "n_bins")

    def __init__(self, ticks: int, n_bins: int = 15):
        super().__init__()
        self.ticks, self.n_bins = ticks, n_bins

    @torch.no_grad()
    def update(self, predictions, certainties, targets, inputs=None) -> None:
        predictions = predictions.float().cpu()
        certainties = certainties.float().cpu()
        targets = targets.long().cpu().view(-1)
        B, C, T = predictions.shape
        if T != self.ticks:
            raise ValueError(f"expected {self.ticks} ticks, got predictions with {T}")
        best = most_certain_tick(certainties)
        Classification.accumulate(self.sums, predictions, targets, torch.ones(B), best, eval=True)
        add = self.sums.add
        for name, logits in readout_logits(predictions, certainties).items():
            for k in TOPK:
                if (name, k) != ("instant", 1):  # that one is training's "per_tick_correct"
                    hits = per_tick_accuracy(logits, targets, k=k, reduction="sum")
                    add(self._sum_name(name, k), hits)
        add("loss", per_tick_cross_entropy(predictions, targets).sum(0))
        add("certainty", certainties[:, 1].sum(0))
        add("most_certain_tick", torch.bincount(best, minlength=T))
        conf = predictions.softmax(1).max(1).values  # [B, T]
        correct = topk_correct(predictions, targets)
        add(
            "calib_per_tick",
            np.stack([calibration_bins(conf[:, t], correct[:, t], self.n_bins) for t in range(T)]),
        )
        rows = torch.arange(B)
        add(
            "calib_most_certain",
            calibration_bins(conf[rows, best], correct[rows, best], self.n_bins),
        )
        add("samples", B)

    @staticmethod
    def _sum_name(readout: str, k: int) -> str:
        return "per_tick_correct" if (readout, k) == ("instant", 1) else f"{readout}/top{k}"

    def accuracy(self, readout: str, k: int) -> np.ndarray:
        """[T] accuracy of a readout at each tick (using ticks up to that one)."""
        return (self.sums[self._sum_name(readout, k)] / max(self.n, 1)).numpy()

    def summary(self) -> dict:
        n = max(self.n, 1)
        T = self.ticks
        out: dict = {"samples": self.n, "ticks": T}
        for r in READOUTS:
            for k in TOPK:
                acc = self.accuracy(r, k)
                out[f"{r}_top{k}_per_tick"] = acc.tolist()
                out[f"{r}_top{k}"] = float(acc[-1])  # using all ticks
        # training's eval/top1 and eval/top5 (the running readout's last tick counts the same)
        out["most_certain_top1"] = float(self.sums["correct"][0]) / n
        out["most_certain_top5"] = float(self.sums["top5"][0]) / n
        out["loss_per_tick"] = (self.sums["loss"] / n).tolist()
        out["certainty_per_tick"] = (self.sums["certainty"] / n).tolist()
        out["most_certain_tick_histogram"] = self.sums["most_certain_tick"].long().tolist()
        per_tick = self.sums["calib_per_tick"].numpy()
        out["ece_per_tick"] = [expected_calibration_error(per_tick[t]) for t in range(T)]
        out["ece_last_tick"] = out["ece_per_tick"][-1]
        most_certain = self.sums["calib_most_certain"].numpy()
        out["ece_most_certain"] = expected_calibration_error(most_certain)
        out["reliability_most_certain"] = reliability(most_certain)
        return out


def reliability(bins: np.ndarray) -> list[dict]:
    """Per-bin mean confidence and accuracy (bins with samples only), for a reliability plot."""
    n_bins = bins.shape[0]
    rows = []
    for i, (count, conf, corr) in enumerate(bins):
        if count > 0:
            rows.append(
                {
                    "low": i / n_bins,
                    "high": (i + 1) / n_bins,
                    "count": int(count),
                    "confidence": float(conf / count),
                    "accuracy": float(corr / count),
                }
            )
    return rows


# ---------------------------------------------------------------- halting sweep

DEFAULT_THRESHOLDS = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95, 0.98, 0.99, 1.01)


def halting_ticks(certainty: torch.Tensor, threshold: float) -> torch.Tensor:
    """[B] index of the first tick with certainty >= threshold, else the last tick."""
    reached = certainty >= threshold  # [B, T]
    T = certainty.shape[-1]
    first = torch.where(
        reached.any(-1),
        reached.float().argmax(-1),
        torch.full_like(reached[:, 0], T - 1, dtype=torch.long),
    )
    return first.long()


class HaltingStats(Measure):
    """Accuracy and ticks used per certainty threshold, from full-length runs, as sums."""

    shape = ("ticks", "thresholds")

    def __init__(self, ticks: int, thresholds: tuple = DEFAULT_THRESHOLDS):
        super().__init__()
        self.ticks, self.thresholds = ticks, tuple(float(t) for t in thresholds)

    @torch.no_grad()
    def update(self, predictions, certainties, targets, inputs=None) -> None:
        """Classification outputs [B, C, T], [B, 2, T] and targets [B]."""
        certainty = certainties[:, 1].float().cpu()
        targets = targets.long().cpu().view(-1)
        correct = per_tick_accuracy(predictions.float().cpu(), targets, reduction="none")  # [B, T]
        rows = torch.arange(correct.shape[0])
        halted = torch.stack([halting_ticks(certainty, thr) for thr in self.thresholds])  # [K, B]
        self.sums.add("correct", correct[rows, halted].sum(1))
        self.sums.add("ticks_used", (halted + 1).sum(1))
        self.sums.add(
            "ticks_histogram",
            torch.stack([torch.bincount(t, minlength=self.ticks) for t in halted]),
        )
        self.sums.add("full_correct", correct[:, -1].sum())
        self.sums.add("samples", correct.shape[0])

    def summary(self) -> dict:
        n = max(self.n, 1)
        full = float(self.sums["full_correct"][0]) / n
        rows = []
        for i, thr in enumerate(self.thresholds):
            top1 = float(self.sums["correct"][i]) / n
            mean_ticks = float(self.sums["ticks_used"][i]) / n
            rows.append(
                {
                    "threshold": thr,
                    "top1": top1,
                    "top1_drop_points": 100 * (full - top1),
                    "mean_ticks": mean_ticks,
                    "tick_saving": 1 - mean_ticks / self.ticks,
                    "ticks_histogram": self.sums["ticks_histogram"][i].long().tolist(),
                }
            )
        return {"samples": self.n, "ticks": self.ticks, "top1_all_ticks": full, "sweep": rows}


# ---------------------------------------------------------------- the tasks


class Classification(ShardTask):
    """Certainty loss; top-1 (and top-5 at evaluation) at the most-certain tick, per-tick accuracy."""

    image_inputs = True
    pictures = frozenset({"classes"})
    headline = {"train": "accuracy", "eval": "top1"}
    rates = {"per_tick_accuracy": "per_tick_correct", "top5": "top5"}
    mean, std = T.IMAGENET_MEAN, T.IMAGENET_STD

    def data_overrides(self):
        classes = self.meta.get("num_classes")
        return {"out_dims": int(classes)} if classes else {}

    def loader_options(self):
        return {"image_size": self.cfg.data.image_size or None}

    def loss(self, predictions, certainties, target, valid):
        return image_classification_loss(predictions, certainties, target, weight=valid)

    @classmethod
    def accumulate(cls, sums, predictions, target, valid, tick, eval=False):
        """A class method: ``ClassificationStats`` counts offline with it."""
        sums.add(
            "correct",
            accuracy_at_most_certain(predictions, target, tick, weight=valid, reduction="sum"),
        )
        sums.add(
            "per_tick_correct",
            per_tick_accuracy(predictions, target, weight=valid, reduction="sum"),
        )
        if eval:
            sums.add(
                "top5", topk_accuracy(predictions, target, tick, k=5, weight=valid, reduction="sum")
            )

    @classmethod
    def evaluation_measures(cls, model_cfg, req):
        T = model_cfg.iterations
        measures = {"classification": ClassificationStats(T)}
        if kind_of(model_cfg) != "ff":  # the feed-forward baseline has no ticks to halt at
            measures["halting"] = HaltingStats(T, tuple(req.thresholds))
        return measures

    @classmethod
    def input_pipeline(cls, meta, image_size):
        decoder = make_decoder(cls.name, False, meta or {}, image_size=image_size)
        return decoder.image_size, tuple(decoder.mean), tuple(decoder.std)

    @classmethod
    def image_tensor(cls, path, data, image_size, mean, std):
        decoder = ClassificationDecoder(
            train=False, task=cls.name, image_size=image_size, mean=mean, std=std
        )
        try:  # the trainer's own evaluation decoder, fed the file as a sample
            x, _ = decoder({"__key__": path, "jpg": data, "cls": b"0"}, np.random.default_rng(0))
        except BadSample:
            raise ValueError(f"{path}: not an image that can be decoded") from None
        return x

    @classmethod
    def display_rgb(cls, x):
        arr = x.detach().float().cpu().numpy().transpose(1, 2, 0)
        return np.clip(arr * np.asarray(cls.std) + np.asarray(cls.mean), 0, 1)

    @classmethod
    def per_tick_loss(cls, predictions, targets):
        return per_tick_cross_entropy(predictions, targets)


class ImageNet(Classification):
    name = "imagenet"
    launch_defaults = {
        "run": {"name": "imagenet", "max_steps": 500_000, "log_every": 100},
        "data": {
            "task": "imagenet",
            "batch_size": 64,
            "eval_batch_size": 64,
            "num_workers": 8,
            "image_size": 224,
        },
        "model": {"preset": "imagenet"},
        "optim": {"lr": 5e-4, "warmup_steps": 10_000, "min_lr": 1e-7, "warmup_start_lr": 1e-20},
        "deepspeed": {"gradient_clipping": 20.0},
        "checkpoint": {"every": 1000, "keep": 3},
        "eval": {"every": 5000, "batches": 200},
    }


class Cifar10(Classification):
    name = "cifar10"
    image_size_from_shards = True
    mean, std = T.CIFAR10_MEAN, T.CIFAR10_STD
    launch_defaults = {
        "run": {"name": "cifar10", "max_steps": 600_000, "log_every": 100},
        "data": {"task": "cifar10", "batch_size": 512, "eval_batch_size": 512, "num_workers": 4},
        "model": {"preset": "cifar10"},
        "optim": {"lr": 1e-4, "warmup_steps": 1000, "min_lr": 1e-7, "warmup_start_lr": 1e-20},
        "checkpoint": {"every": 1000},
        "eval": {"every": 1000, "batches": 20},
    }


class Demo(Classification):
    """Small digit images; training without ``data.url`` writes them into the embedded store."""

    name = "demo"
    built_in_data = True
    image_size_from_shards = True
    # digits at 8x8 (their native resolution) so that bf16 on two CPU cores reaches >= 90% top-1
    # in a few minutes; tick checkpointing on to exercise it
    launch_defaults = {"data": {"image_size": 8}, "model": {"tick_checkpointing": 4}}

    @classmethod
    def config_for(cls, preset_name, overrides, kind="ctm"):
        # tick checkpointing is the CTM's; the baselines' configs have no such field
        if kind != "ctm":
            overrides = {k: v for k, v in overrides.items() if k != "tick_checkpointing"}
        return super().config_for(preset_name, overrides, kind)
