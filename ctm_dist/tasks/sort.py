"""Sorting: N real numbers generated on the fly, their sorting order emitted one element per tick.

The model is the CTM's sort variant (``ctm_dist/model/sort.py``): it reads the N numbers directly
and predicts, at every tick, one of the N input positions or a blank. It is trained with CTC over
the ticks, as the reference's ``tasks/sort/train.py``; the greedily decoded order is scored per
position and as a whole sequence. Chance per position is 1/N (a random order); a model that emits
nothing scores 0. The preset decides N (``model.sequence_length`` overrides it) and the data
follows the model.
"""

from __future__ import annotations

import torch

from ctm_dist.data.sort import SortLoader
from ctm_dist.losses import (
    decode_sort,
    sort_correct,
    sort_loss,
    sort_position_accuracy,
    sort_sequence_accuracy,
)

from .base import GeneratedTask
from .sums import Measure


class SortStats(Measure):
    """Accuracy of the decoded order per position and over whole sequences, as sums.

    ``Sort.accumulate`` adds the sums training has (mean per-position and whole-sequence
    accuracy); the per-position counts are the same ``sort_correct``.
    """

    shape = ("length",)

    def __init__(self, length: int):
        super().__init__()
        self.length = length

    @torch.no_grad()
    def update(self, predictions, certainties, targets, inputs=None) -> None:
        predictions, targets = predictions.float().cpu(), targets.long().cpu()
        if targets.shape[1:] != (self.length,):
            raise ValueError(f"expected {self.length} positions, got {tuple(targets.shape[1:])}")
        B = targets.shape[0]
        Sort.accumulate(self.sums, predictions, targets, torch.ones(B), tick=None)  # CTC: no tick
        self.sums.add("hits", sort_correct(predictions, targets).sum(0))  # [N]
        decoded = decode_sort(predictions, self.length)
        self.sums.add("emitted", (decoded != predictions.shape[1] - 1).sum())
        self.sums.add("samples", B)

    def summary(self) -> dict:
        n = max(self.n, 1)
        return {
            "samples": self.n,
            "length": self.length,
            "accuracy_per_position": (self.sums["hits"] / n).tolist(),
            "accuracy": float(self.sums["correct"][0] / n),
            "sequence_accuracy": float(self.sums["all_correct"][0] / n),
            "emitted_per_sequence": float(self.sums["emitted"][0] / n),
            "chance_accuracy": 1.0 / self.length,
        }


class Sort(GeneratedTask):
    """CTC loss over the ticks; per-position and whole-sequence accuracy of the decoded order."""

    name = "sort"
    loader_class = SortLoader
    pictures = frozenset({"order"})
    headline = {"train": "accuracy", "eval": "step_accuracy"}
    rates = {"sequence_accuracy": "all_correct"}
    # tasks/sort/train.py's defaults: batch 32, AdamW lr 1e-3 with 5000 warmup steps and a cosine
    # to 1e-7 over 100001 iterations, no gradient clipping, metrics and checkpoints every 1000
    launch_defaults = {
        "run": {"name": "sort", "max_steps": 100_001, "log_every": 100},
        "data": {"task": "sort", "batch_size": 32, "eval_batch_size": 32},
        "model": {"preset": "sort"},
        "optim": {"lr": 1e-3, "warmup_steps": 5000, "min_lr": 1e-7, "warmup_start_lr": 1e-20},
        "deepspeed": {"gradient_clipping": 0.0},
        "checkpoint": {"every": 1000},
        "eval": {"every": 1000, "batches": 3},
    }

    def __init__(self, cfg, rank, world_size):
        super().__init__(cfg, rank, world_size)
        self.sequence_length = self._sort_model(self.model_config()).d_input

    @classmethod
    def preflight(cls, cfg):
        """The preset must be a sort model (another CTM cannot read N numbers or emit an order)."""
        cls(cfg, 0, 1)  # settles the model config and checks it

    @staticmethod
    def _sort_model(model_cfg):
        if model_cfg.variant != "sort":
            raise ValueError(
                f"the sort task needs a sort model (model.preset=sort or sort-small); this preset "
                f"builds the {model_cfg.variant!r} variant"
            )
        return model_cfg

    def loss(self, predictions, certainties, target, valid):
        """CTC over every tick; no tick is chosen, so each sample is 'judged' at the last one."""
        last = torch.full(
            (predictions.size(0),), predictions.size(-1) - 1, device=predictions.device
        )
        return sort_loss(predictions, target, weight=valid), last

    @classmethod
    def accumulate(cls, sums, predictions, target, valid, tick, eval=False):
        """A class method: ``SortStats`` counts offline with it."""
        sums.add(
            "correct",
            sort_position_accuracy(predictions, target, weight=valid, reduction="sum"),
        )
        sums.add(
            "all_correct",
            sort_sequence_accuracy(predictions, target, weight=valid, reduction="sum"),
        )

    @classmethod
    def target_length(cls, model_cfg):
        return model_cfg.d_input

    @classmethod
    def evaluation_loader(cls, model_cfg, data, req, rank, world_size):
        """``req.parity_samples`` inputs of ``req.parity_seed`` (the generated-data options),
        split over the workers."""
        return SortLoader(
            model_cfg.d_input,
            batch_size=req.batch_size,
            rank=rank,
            world_size=world_size,
            seed=req.parity_seed,
            samples_per_epoch=req.parity_samples,
        )

    @classmethod
    def evaluation_measures(cls, model_cfg, req):
        return {"sort": SortStats(model_cfg.d_input)}

    @classmethod
    def per_tick_loss(cls, predictions, targets):
        """None: CTC scores the whole order over all ticks, no single tick has a loss of its own."""
        return None
