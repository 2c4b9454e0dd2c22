"""Q&A MNIST: arithmetic questions about digits seen one after another, drawn on the fly.

The data is a digit shard set (``datasets/qamnist.py``: MNIST or scikit-learn's digits); the
questions are drawn from it by ``ctm_dist.data.qamnist.QAMNISTLoader`` with the model config's
curriculum and tick counts. The model is the QAMNIST CTM or its LSTM baseline
(``model.kind=lstm``), called ``m(x, z)``: a batch's input is the pair (digit images, question
codes) and its target the pair (answer, number of operations) ``[B, 2]``. The loss and accuracy
read only the answer ticks; accuracy is also reported per number of operations
(``{split}/accuracy_ops_N``). Offline evaluation asks held-out questions and reports the same
accuracies; the pictures are the certainty and answer per tick (``qamnist_offline.py``). Exports
in the reference's format are its QAMNIST script's (``dataset`` ``qamnist``).
"""

from __future__ import annotations

import torch

from ctm_dist.data.qamnist import DigitPool, QAMNISTLoader
from ctm_dist.losses.metrics import accuracy_at_most_certain
from ctm_dist.losses.qamnist import answer_ticks_of, correct_by_operations, qamnist_loss
from ctm_dist.model import QAMNISTConfig, preset
from ctm_dist.model.qamnist import QAMNIST_PRESETS, build_qamnist_model

from .base import EVAL_BATCHES, EVAL_SEED_OFFSET, ShardTask
from .qamnist_offline import QAMNISTStats, operation_counts, question_charts, question_loader


class QAMNIST(ShardTask):
    """Answer accuracy at the judged answer tick, overall and per number of operations."""

    name = "qamnist"
    headline = {"train": "accuracy", "eval": "accuracy"}
    launch_defaults = {
        "run": {"name": "qamnist", "max_steps": 100_000, "log_every": 100},
        "data": {"task": "qamnist", "batch_size": 64, "eval_batch_size": 256},
        "model": {"preset": "qamnist"},
        "optim": {"lr": 1e-3, "warmup_steps": 5000, "min_lr": 1e-7, "warmup_start_lr": 1e-20},
        "checkpoint": {"every": 1000},
        "eval": {"every": 1000, "batches": 20},
    }

    def __init__(self, cfg, rank, world_size):
        super().__init__(cfg, rank, world_size)
        self.qcfg = self.model_config()
        self.counts = operation_counts(self.qcfg)
        self._pools: dict[str, DigitPool] = {}

    @classmethod
    def preflight(cls, cfg):
        super().preflight(cfg)
        if cfg.model.preset not in QAMNIST_PRESETS:
            raise ValueError(
                f"task qamnist needs a QAMNIST model preset ({', '.join(QAMNIST_PRESETS)}), "
                f"got {cfg.model.preset!r}"
            )

    def model_config(self) -> QAMNISTConfig:
        values = dict(self.cfg.model.overrides)
        if self.cfg.model.preset not in QAMNIST_PRESETS:
            raise ValueError(
                f"task qamnist needs a QAMNIST model preset ({', '.join(QAMNIST_PRESETS)}), "
                f"got {self.cfg.model.preset!r}"
            )
        values.setdefault("kind", self.cfg.model.kind)  # model.kind picks the CTM or the LSTM
        return preset(self.cfg.model.preset, **values)

    @classmethod
    def build_model(cls, model_cfg):
        return build_qamnist_model(model_cfg)

    @classmethod
    def config_type(cls, fields):
        return QAMNISTConfig

    @classmethod
    def reference_dataset(cls, meta):
        return "qamnist"

    def forward(self, model, x):
        images, question = x
        predictions, certainties, _ = model(images, question)
        return predictions, certainties

    # --- data
    def _pool(self, split: str) -> DigitPool:
        if split not in self._pools:
            self._pools[split] = DigitPool.read(self.location, split)
        return self._pools[split]

    def _loader(self, split, batch_size, train, seed, **extra):
        return QAMNISTLoader.for_model(
            self._pool(split),
            self.qcfg,
            batch_size=batch_size,
            rank=self.rank,
            world_size=self.world_size,
            seed=seed,
            image_size=self.cfg.data.image_size or None,
            **extra,
        )

    def train_loader(self, batch_size, seed):
        return self._loader(self.train_split, batch_size, True, seed)

    def eval_loader(self, batch_size):
        """Questions on the validation digits (another seed), the same at every evaluation; the
        numbers of operations take turns so that each is measured."""
        batches = self.cfg.eval.batches or EVAL_BATCHES
        return self._loader(
            self.eval_split,
            batch_size,
            False,
            self.cfg.run.seed + EVAL_SEED_OFFSET,
            samples_per_epoch=batches * batch_size * self.world_size,
            cycle_operations=True,
        )

    def to_device(self, batch, device, dtype):
        images = batch["input"].to(device, dtype, non_blocking=True)
        question = batch["question"].to(device, non_blocking=True)
        target = torch.stack((batch["target"], batch["operations"]), 1).to(device)
        return (images, question), target, batch["valid"].to(device).float()

    # --- objective and metrics
    def loss(self, predictions, certainties, target, valid):
        return qamnist_loss(
            predictions,
            certainties,
            target[:, 0],
            self.qcfg.iterations_for_answering,
            use_most_certain=self.qcfg.kind == "ctm",
            weight=valid,
        )

    def accumulate(self, sums, predictions, target, valid, tick, eval=False):
        answers = answer_ticks_of(predictions, self.qcfg.iterations_for_answering)
        sums.add(
            "correct",
            accuracy_at_most_certain(answers, target[:, 0], tick, weight=valid, reduction="sum"),
        )
        correct, questions = correct_by_operations(
            answers, target[:, 0], tick, target[:, 1], self.counts, weight=valid
        )
        sums.add("correct_by_operations", correct)
        sums.add("questions_by_operations", questions)

    def summarise(self, reduced, split):
        out = super().summarise(reduced, split)
        if "correct_by_operations" in reduced:
            correct = reduced["correct_by_operations"]
            questions = reduced["questions_by_operations"]
            for count, c, n in zip(self.counts, correct.tolist(), questions.tolist()):
                if n > 0:
                    out[f"{split}/accuracy_ops_{count}"] = c / n
        return out

    # --- offline evaluation and pictures
    @classmethod
    def evaluation_loader(cls, model_cfg, data, req, rank, world_size):
        """``req.qamnist_questions`` questions of ``req.qamnist_seed`` on the digits of
        ``req.split``, split over the workers. A batch's numbers of digits and operations are
        drawn per global batch, so ``req.batch_size`` is the global batch: the same questions
        whatever the number of workers."""
        if req.batch_size % world_size:
            raise ValueError(
                f"Q&A MNIST: --batch-size ({req.batch_size}) must be a multiple of --workers "
                f"({world_size}): it is the global batch, whose questions do not depend on them"
            )
        return question_loader(
            model_cfg,
            data,
            req.split,
            batch_size=req.batch_size // world_size,
            seed=req.qamnist_seed,
            questions=req.qamnist_questions,
            rank=rank,
            world_size=world_size,
            image_size=req.image_size,
        )

    @classmethod
    def input_pipeline(cls, meta, image_size):
        """Digits resized to ``data.image_size`` when training set one (the loader normalises
        with the shard set's mean and std); None: their stored size."""
        if not image_size:
            return None
        return image_size, (float(meta.get("mean", 0.0)),), (float(meta.get("std", 1.0)),)

    @classmethod
    def evaluation_batch(cls, batch):
        valid = batch["valid"].bool()
        inputs = (batch["input"][valid], batch["question"][valid])
        return inputs, torch.stack((batch["target"], batch["operations"]), 1)[valid]

    @classmethod
    def evaluation_forward(cls, model, inputs):
        images, question = inputs
        predictions, certainties, _ = model(images.float(), question)
        return predictions, certainties

    @classmethod
    def evaluation_measures(cls, model_cfg, req):
        return {"qamnist": QAMNISTStats(model_cfg)}

    @classmethod
    def picture_charts(cls, model, meta, data, req):
        return question_charts(model, data, req)
