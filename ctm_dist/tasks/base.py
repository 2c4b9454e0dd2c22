"""The ``Task`` base class: everything the trainer, the evaluation tools and the pictures need to
know about one task, in one class per task.

A task is used two ways:

* **training** builds one object per rank, ``task = cls(cfg, rank, world_size)`` (``cfg`` is the
  training config, :class:`ctm_dist.train.config.TrainConfig`, read by attribute only). Every
  value the model and the loaders share (classes, route length, sequence length) is settled in
  ``__init__``, so ``model_config``, ``train_loader`` and ``eval_loader`` may be called in any order.
* **offline evaluation and pictures** use class methods: there is no training config then, the
  model's own config (``CTMConfig``) gives the output shape.

Metrics are :class:`~ctm_dist.tasks.sums.MetricSums`: training all-reduces them over ranks,
evaluation merges them over Ray workers.
"""

from __future__ import annotations

import numpy as np
import torch

from ctm_dist.data.index import read_index
from ctm_dist.data.reader import ShardLoader
from ctm_dist.model import CTMConfig, build_model, kind_of_fields, model_config
from ctm_dist.model.kinds import CONFIG_TYPES
from ctm_dist.storage import Location

from .charts import Chart, PictureRequest
from .sums import Measure, MetricSums

SPLITS = ("train", "eval")  # the metric-name prefixes of ``summarise``
EVAL_SEED_OFFSET = 7919  # held-out data: another seed than the training stream
EVAL_BATCHES = 8  # evaluation batches of generated data when eval.batches is 0 (it is endless)


class Task:
    """Base class. Batches are dicts with ``input``, ``target`` and ``valid`` (0 = padding)."""

    name = ""  # the registry name, ``data.task``
    generated_data = False  # data made on the fly: no shard set, in training or evaluation
    built_in_data = False  # training without ``data.url`` writes its own shard set
    image_inputs = False  # inputs are images: an input pipeline, image files, attention pictures
    image_size_from_shards = False  # the model's input size is the shard set's image size
    # extra pictures: "classes" (class names), "route" (GIF), "order" (sorting order per tick)
    pictures: frozenset = frozenset()
    # ``summarise``: the headline accuracy (sum "correct") is named per split; ``rates`` are the
    # other metrics, each a sum divided by the samples (metric name -> sum name)
    headline = {"train": "accuracy", "eval": "step_accuracy"}
    rates: dict = {}
    # visualize draws from the model alone (``picture_charts``): no shard set or image files
    pictures_from_model = False
    # the launcher's own flags: --name -> help; ``flag_overrides`` turns given ones into overrides
    launch_flags: dict = {}
    # the launcher's config defaults (``launch/<name>.py``), under the dataclass defaults' sections
    launch_defaults: dict = {}
    # the launcher's ``--preset NAME``: a model preset with the training settings that go with it,
    # over ``launch_defaults`` (e.g. the small presets that learn on two CPU cores)
    run_presets: dict = {}

    # ------------------------------------------------------------------ training (one rank)

    def __init__(self, cfg, rank: int, world_size: int):
        self.cfg, self.rank, self.world_size = cfg, rank, world_size

    @classmethod
    def preflight(cls, cfg) -> None:
        """Run by the driver before any worker starts: raise a clear error for data that cannot work."""

    def data_overrides(self) -> dict:
        """CTMConfig fields (or preset arguments) the data decides: classes, route length..."""
        return {}

    @classmethod
    def flag_overrides(cls, flags: dict) -> list[str]:
        """Dotted overrides (``section.field=value``) for the given ``launch_flags`` values; they
        come after the common flags' and before the command line's own overrides."""
        return []

    @classmethod
    def config_for(cls, preset_name: str, overrides: dict, kind: str = "ctm"):
        """The model config of ``kind`` (``model.kind``) from preset ``preset_name`` with
        ``overrides`` (also what config validation builds to check ``model.*``)."""
        return model_config(kind, preset_name, **overrides)

    def model_config(self) -> CTMConfig:
        """The config of ``model.kind`` (the CTM, or the LSTM baseline) from the preset, the data's
        fields and the ``model.*`` overrides."""
        values = self.data_overrides()
        values.update(self.cfg.model.overrides)
        return self.config_for(self.cfg.model.preset, values, self.cfg.model.kind)

    @classmethod
    def build_model(cls, model_cfg: CTMConfig) -> torch.nn.Module:
        """The module of a model config: what the trainer wraps in its DeepSpeed engine (same
        weights on every rank: the trainer seeds before calling it), and what the offline tools
        load a run's or an export's weights into: the model of the config's kind and variant."""
        return build_model(model_cfg)

    @classmethod
    def config_type(cls, fields: dict) -> type:
        """The config class of a saved field dict (a run's COMMIT marker, an export's config)."""
        return CONFIG_TYPES[kind_of_fields(fields)]

    @classmethod
    def run_meta(cls, train_config: dict) -> dict:
        """What the offline tools need of a run's training config (a dict) beyond the model's
        config and the shard set's metadata (RL: the environment). Kept in exports' ``meta``."""
        return {}

    @classmethod
    def reference_dataset(cls, meta: dict) -> str | None:
        """The reference's ``dataset`` for exporting a run in its format, when the run tells it
        (``meta``: the model's metadata); None: it must be given."""
        return None

    def bind_model(self, model) -> None:
        """Called with the trainer's engine once it is built; a task that acts with the model
        (RL: rollouts) keeps it. Default: nothing."""

    def training_loss(self, engine, batch: dict, sums: MetricSums, device, dtype) -> torch.Tensor:
        """One micro-batch's loss for the trainer's backward, its metric sums added to ``sums``."""
        x, target, valid = self.to_device(batch, device, dtype)
        predictions, certainties = self.forward(engine, x)
        loss, tick = self.loss(predictions.float(), certainties.float(), target, valid)
        with torch.no_grad():
            n = valid.sum()
            sums.add("loss_sum", loss.detach() * n)
            sums.add("samples", n)
            self.accumulate(sums, predictions.detach().float(), target, valid, tick)
            sums.add_ticks(tick[valid.bool()])
        return loss

    def evaluate_model(self, engine, device) -> dict | None:
        """Evaluation metrics measured by the task itself (RL: episodes played), or None (the
        default): the trainer evaluates on ``eval_loader``."""
        return None

    def forward(self, model, x):
        """(predictions [B, out, T], certainties [B, 2, T]) of the model (or its engine) on ``x``."""
        predictions, certainties, _ = model(x)
        return predictions, certainties

    def train_loader(self, batch_size: int, seed: int):
        """A resumable loader (``state_dict``/``load_state_dict``) of this rank's batches."""
        raise NotImplementedError

    def eval_loader(self, batch_size: int):
        """This rank's part of the validation data, the same samples at every evaluation."""
        raise NotImplementedError

    def to_device(self, batch: dict, device: torch.device, dtype: torch.dtype):
        x = batch["input"].to(device, non_blocking=True)
        if x.is_floating_point():
            x = x.to(dtype)
        target = batch["target"].to(device, non_blocking=True)
        valid = batch.get("valid")
        valid = torch.ones(x.size(0), device=device) if valid is None else valid.to(device).float()
        return x, target, valid

    def loss(self, predictions, certainties, target, valid):
        """(loss over valid samples, the tick each sample is judged at [B])."""
        raise NotImplementedError

    def accumulate(
        self, sums: MetricSums, predictions, target, valid, tick, eval: bool = False
    ) -> None:
        """Add a batch's metric sums (``samples`` and ``loss_sum`` are added by the trainer).

        The one definition of the task's metrics: a task whose metrics need only the outputs makes
        it a class method, and its offline measures count with it too."""
        raise NotImplementedError

    def summarise(self, reduced: dict, split: str) -> dict:
        """Metrics named ``{split}/...`` from reduced sums; ``split`` is "train" or "eval"."""
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        n = max(float(reduced["samples"][0]), 1.0)
        out = {}
        for metric, sum_name in {self.headline[split]: "correct", **self.rates}.items():
            if sum_name in reduced:
                value = reduced[sum_name]
                out[f"{split}/{metric}"] = (
                    float(value[0]) / n if value.numel() == 1 else [float(v) / n for v in value]
                )
        return out

    # ------------------------------------------------------------------ offline evaluation

    @classmethod
    def target_length(cls, model_cfg: CTMConfig) -> int | None:
        """Positions in a target sequence the model's output answers (None: one label)."""
        return None

    @classmethod
    def evaluation_loader(cls, model_cfg: CTMConfig, data: Location | None, req, rank, world_size):
        """The evaluation data of one worker. ``req`` is a ``ctm_dist.eval.evaluate.EvalRequest``
        (``split``, ``batch_size``, ``image_size``, ...); ``data`` is its shard set."""
        return ShardLoader(
            data,
            req.split,
            task=cls.name,
            batch_size=req.batch_size,
            rank=rank,
            world_size=world_size,
            train=False,
            image_size=req.image_size,
            route_length=cls.target_length(model_cfg),
            decoder_factory=cls.decoder,
        )

    @classmethod
    def decoder(cls, train: bool, meta: dict):
        """The task's own sample decoder (a ``ctm_dist.data.decode.Decoder``), or None for the one
        ``ctm_dist.data.decode.make_decoder`` has for the task's name (the built-in shard formats)."""
        return None

    @classmethod
    def evaluation_measures(cls, model_cfg: CTMConfig, req) -> dict[str, Measure]:
        """The report's sections (name -> Measure) filled batch by batch; what training reports
        too they count with ``accumulate``."""
        raise NotImplementedError

    @classmethod
    def evaluation_batch(cls, batch: dict):
        """(inputs, targets) of the valid samples of a batch of ``evaluation_loader``."""
        valid = batch["valid"].bool()
        return batch["input"][valid], batch["target"][valid]

    @classmethod
    def evaluation_forward(cls, model, inputs):
        """(predictions, certainties) of the model on ``evaluation_batch``'s inputs."""
        predictions, certainties, _ = model(inputs.float())
        return predictions, certainties

    @classmethod
    def evaluation_extras(
        cls, model, req, locate, rank: int, world_size: int, meta: dict | None = None
    ) -> dict:
        """Sections measured apart from the batches (``locate(name)``: a request's Location;
        ``meta``: the model's metadata, with ``run_meta``'s values)."""
        return {}

    @classmethod
    def picture_charts(
        cls, model, meta: dict, data: Location | None, req: PictureRequest
    ) -> list[Chart] | None:
        """The task's own pictures, drawn by running the model (``data``: its shard set, if
        any), or None (the default): the shared pictures of image or sequence inputs."""
        return None

    # ------------------------------------------------------------------ inputs and pictures

    @classmethod
    def input_pipeline(cls, meta: dict, image_size: int | None):
        """(image size, mean, std) of the evaluation transform, or None for inputs that are no images."""
        return None

    @classmethod
    def image_tensor(cls, path: str, data: bytes, image_size, mean, std) -> torch.Tensor:
        """One image file as the model's input [3, H, W] (ValueError when it is no image)."""
        raise ValueError(f"task {cls.name!r} takes no images")

    @classmethod
    def display_rgb(cls, x: torch.Tensor) -> np.ndarray:
        """A model input [3, H, W] back to RGB [H, W, 3] in [0, 1]."""
        arr = x.detach().float().cpu().numpy().transpose(1, 2, 0)
        lo, hi = arr.min(), arr.max()
        return (arr - lo) / (hi - lo + 1e-12)

    @classmethod
    def per_tick_loss(cls, predictions: torch.Tensor, targets: torch.Tensor) -> torch.Tensor | None:
        """Cross-entropy [B, T] at every tick (None: the task's loss has no per-tick value)."""
        raise NotImplementedError


class GeneratedTask(Task):
    """A task whose data is generated on the fly (a ``GeneratedLoader`` over ``sequence_length``),
    set in ``__init__``: the training stream, and held-out data of another seed for evaluation."""

    generated_data = True
    loader_class: type  # a ctm_dist.data.generated.GeneratedLoader subclass

    def train_loader(self, batch_size, seed):
        return self.loader_class(
            self.sequence_length,
            batch_size=batch_size,
            rank=self.rank,
            world_size=self.world_size,
            seed=seed,
        )

    def eval_loader(self, batch_size):
        """Held-out data (another seed), the same samples at every evaluation."""
        batches = self.cfg.eval.batches or EVAL_BATCHES
        return self.loader_class(
            self.sequence_length,
            batch_size=batch_size,
            rank=self.rank,
            world_size=self.world_size,
            seed=self.cfg.run.seed + EVAL_SEED_OFFSET,
            samples_per_epoch=batches * batch_size * self.world_size,
        )


class ShardTask(Task):
    """A task whose data is a shard set (``{url}/{split}-*.tar`` + ``{split}.json``)."""

    train_split, eval_split = "train", "val"

    def __init__(self, cfg, rank, world_size):
        super().__init__(cfg, rank, world_size)
        self.location = self.data_location(cfg)
        self.meta = read_index(self.location, self.train_split).meta
        self._eval = None

    @staticmethod
    def data_location(cfg) -> Location:
        return Location.parse(cfg.data.url, retry_deadline=cfg.run.storage_retry_deadline)

    @classmethod
    def preflight(cls, cfg):
        """Both splits' indexes must be readable (reachable store, right keys, shards written)."""
        location = cls.data_location(cfg)
        for split in (cls.train_split, cls.eval_split):
            read_index(location, split)

    def loader_options(self) -> dict:
        """ShardLoader arguments this task settles (image size, route length)."""
        return {}

    def _loader(self, split: str, batch_size: int, train: bool, seed: int):
        return ShardLoader(
            self.location,
            split,
            task=self.name,
            batch_size=batch_size,
            rank=self.rank,
            world_size=self.world_size,
            train=train,
            seed=seed,
            num_workers=self.cfg.data.num_workers,
            global_order=self.cfg.data.global_order,
            decoder_factory=self.decoder,
            **self.loader_options(),
        )

    def train_loader(self, batch_size, seed):
        return self._loader(self.train_split, batch_size, train=True, seed=seed)

    def eval_loader(self, batch_size):
        """The validation split from its start (the loader is built once and rewound)."""
        if self._eval is None:
            self._eval = self._loader(
                self.eval_split, batch_size, train=False, seed=self.cfg.run.seed
            )
        self._eval.set_epoch(self._eval.epoch + 1)
        return self._eval


def sequence_loss_per_tick(
    predictions: torch.Tensor, targets: torch.Tensor, choices: int
) -> torch.Tensor:
    """Cross-entropy [B, T] of a [B, L * choices, T] output against [B, L] targets, mean over L."""
    B, D, T = predictions.shape
    logits = predictions.reshape(B, D // choices, choices, T)
    tgt = targets.long().reshape(B, -1)[:, :, None].expand(B, D // choices, T)
    return torch.nn.functional.cross_entropy(logits.transpose(1, 2), tgt, reduction="none").mean(1)
