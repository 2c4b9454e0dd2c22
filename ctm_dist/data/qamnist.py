"""Q&A MNIST questions drawn on the fly from a digit shard set (``qamnist_writer.py``).

A question, as in the reference's ``QAMNISTDataset``: ``digits`` images are drawn (uniformly,
with replacement) from the split's pool; the question picks a digit by its index, then for each
of ``operations`` steps an operator (``+``/``-``, coded -1/-2) and another index; the answer is
the running value modulo 10. Each image is repeated for ``repeats`` ticks, each question part
for ``question_repeats`` (the reference: the same number). A batch is ``dict(input [B, digits*repeats, 1, S, S], question [B, parts*repeats] long,
target [B], operations [B], digits [B], valid [B], key)``.

The curriculum: like the reference's sampler, every batch draws its number of digits and of
operations uniformly from ``[n - delta, n + delta)`` (the reference's ``np.random.randint``
excludes the upper end, so with its defaults 3 +- 2 a batch has 1-4 digits and 1-4
operations). The draw belongs to the global batch (the ``batch_size * world_size`` samples of
one step), so all ranks run the same number of ticks at each step. Evaluation
(``cycle_operations``) runs the operation counts in turn, so every count is measured.

Everything a batch holds depends only on ``(seed, epoch, global batch, sample)``; rank ``r``
takes its slice of each global batch. The position (epoch, samples consumed) is the state, as
for ``ParityLoader``: a resumed job continues the stream where it stopped.
"""

from __future__ import annotations

import io
import logging
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.nn import functional as F

from ctm_dist.storage import Location

from .generated import GeneratedLoader, merge_generated_states
from .index import read_index
from .reader import DataError, ShardStream

log = logging.getLogger(__name__)
STATE_FORMAT = "ctm-dist-qamnist/1"
MODULO = 10
MAX_LOGGED_SKIPS = 5


class DigitPool:
    """Every digit of one split in memory: images [N, H, W] uint8, labels [N], and the index meta."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, meta: dict, skipped: int = 0):
        if len(images) == 0:
            raise ValueError("the digit pool is empty: no sample of the split could be decoded")
        self.images, self.labels, self.meta, self.skipped = images, labels, meta, skipped

    @classmethod
    def read(cls, location: Location | str, split: str) -> DigitPool:
        """Decode every sample of ``split``; undecodable ones are skipped, counted and logged."""
        location = Location.parse(location) if isinstance(location, str) else location
        index = read_index(location, split)
        images, labels, skipped = [], [], 0
        for shard in index.shards:
            stream = ShardStream(location, shard.name)
            try:
                for _ in range(shard.samples):
                    sample = stream.next()
                    if sample is None:
                        skipped += shard.samples - stream.read
                        log.warning("%s ends before its %d samples", stream.url, shard.samples)
                        break
                    try:
                        image = np.asarray(Image.open(io.BytesIO(sample["png"])).convert("L"))
                        label = int(sample["cls"])
                        if not 0 <= label < MODULO:
                            raise ValueError(f"class {label} is not a digit")
                    except Exception as err:  # a bad sample is skipped, whatever broke it
                        skipped += 1
                        if skipped <= MAX_LOGGED_SKIPS:
                            log.warning("%s key %r skipped: %s", stream.url, stream.last_key, err)
                        continue
                    images.append(image)
                    labels.append(label)
            except DataError as err:
                raise ValueError(str(err)) from None
            finally:
                stream.close()
        shapes = {im.shape for im in images}
        if len(shapes) > 1:
            raise ValueError(
                f"{location.url}/{split}: digit images differ in size: {sorted(shapes)}"
            )
        stacked = np.stack(images) if images else np.zeros((0, 1, 1), np.uint8)
        return cls(stacked, np.asarray(labels, np.int64), index.meta, skipped)


def curriculum_range(n: int, delta: int) -> tuple[int, int]:
    """``[n - delta, n + delta]``, as the reference's dataset computes it (the minimum must be >= 1)."""
    if n - delta < 1:
        raise ValueError(f"{n} - {delta} leaves fewer than 1 (digits and operations start at 1)")
    return n - delta, n + delta


def draw_count(rng: np.random.Generator, low: int, high: int) -> int:
    """The reference's per-batch draw: ``low`` if the range is one value, else uniform in ``[low, high)``."""
    return low if low == high else int(rng.integers(low, high))


def make_question(
    rng: np.random.Generator, labels: np.ndarray, operations: int, repeats: int
) -> tuple[np.ndarray, int]:
    """(question codes [(1 + 2*operations) * repeats], answer) over digits with ``labels``."""
    first = int(rng.integers(len(labels)))
    parts = [first]
    value = int(labels[first]) % MODULO
    for _ in range(operations):
        operator = int(rng.integers(2))  # 0: '+', 1: '-'
        index = int(rng.integers(len(labels)))
        parts += [-(operator + 1), index]
        digit = int(labels[index])
        value = (value + digit) % MODULO if operator == 0 else (value - digit) % MODULO
    return np.repeat(np.asarray(parts, np.int64), repeats), value


class QAMNISTLoader(GeneratedLoader):
    """Batches of Q&A MNIST questions (see the module docstring).

    The epoch position, its iteration and its state are ``GeneratedLoader``'s; a batch is drawn
    whole (``batch``), since its digit and operation counts belong to the global batch.
    """

    state_format, kind = STATE_FORMAT, "QAMNIST"

    @classmethod
    def for_model(cls, pool: DigitPool, qcfg, **options) -> QAMNISTLoader:
        """The loader of the questions a Q&A MNIST model of config ``qcfg`` (a ``QAMNISTConfig``:
        its curriculum and its ticks per digit and per question part) trains on; ``options``
        are the other arguments of ``__init__``."""
        return cls(
            pool,
            num_digits=qcfg.num_digits,
            num_digits_delta=qcfg.num_digits_delta,
            num_operations=qcfg.num_operations,
            num_operations_delta=qcfg.num_operations_delta,
            repeats=qcfg.iterations_per_digit,
            question_repeats=qcfg.iterations_per_question_part,
            **options,
        )

    def __init__(
        self,
        pool: DigitPool,
        *,
        batch_size: int,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        num_digits: int = 3,
        num_digits_delta: int = 2,
        num_operations: int = 3,
        num_operations_delta: int = 2,
        repeats: int = 10,
        question_repeats: int | None = None,
        image_size: int | None = None,
        samples_per_epoch: int | None = None,
        cycle_operations: bool = False,
    ):
        super().__init__(
            batch_size=batch_size,
            rank=rank,
            world_size=world_size,
            seed=seed,
            samples_per_epoch=samples_per_epoch or len(pool.images),
        )
        if batch_size < 1 or repeats < 1:
            raise ValueError(f"batch_size and repeats must be >= 1, got {batch_size}, {repeats}")
        self.pool = pool
        self.digit_range = curriculum_range(num_digits, num_digits_delta)
        self.operation_range = curriculum_range(num_operations, num_operations_delta)
        self.repeats = repeats
        self.question_repeats = question_repeats or repeats
        self.image_size = image_size or int(pool.meta.get("image_size") or pool.images.shape[1])
        self.mean = float(pool.meta.get("mean", 0.0))
        self.std = float(pool.meta.get("std", 1.0)) or 1.0
        self.cycle_operations = cycle_operations
        self.stats["skipped"] = pool.skipped

    def operation_counts(self) -> list[int]:
        """Every number of operations a batch can have."""
        low, high = self.operation_range
        return list(range(low, high)) if high > low else [low]

    def counts(self, global_batch: int) -> tuple[int, int]:
        """(digits, operations) of global batch ``global_batch`` of the current epoch."""
        rng = np.random.default_rng([self.seed, self.epoch, 1, global_batch])
        digits = draw_count(rng, *self.digit_range)
        operations = draw_count(rng, *self.operation_range)
        if self.cycle_operations:
            ops = self.operation_counts()
            operations = ops[global_batch % len(ops)]
        return digits, operations

    def batch(self, global_batch: int) -> dict[str, Any]:
        """This rank's part of global batch ``global_batch`` of the current epoch."""
        digits, operations = self.counts(global_batch)
        first = global_batch * self.batch_size * self.world_size + self.rank * self.batch_size
        indices = np.arange(first, first + self.batch_size)
        chosen = np.empty((self.batch_size, digits), np.int64)
        questions, answers = [], []
        for row, n in enumerate(indices.tolist()):
            rng = np.random.default_rng([self.seed, self.epoch, 0, n])
            chosen[row] = rng.integers(len(self.pool.labels), size=digits)
            question, answer = make_question(
                rng, self.pool.labels[chosen[row]], operations, self.question_repeats
            )
            questions.append(question)
            answers.append(answer)
        images = torch.from_numpy(self.pool.images[chosen.reshape(-1)]).float().div_(255.0)
        images = images.unsqueeze(1)  # [B * digits, 1, H, W]
        if images.shape[-1] != self.image_size or images.shape[-2] != self.image_size:
            images = F.interpolate(
                images, size=(self.image_size,) * 2, mode="bilinear", antialias=True
            )
        images = (images - self.mean) / self.std
        x = images.unflatten(0, (self.batch_size, digits)).repeat_interleave(self.repeats, dim=1)
        valid = torch.from_numpy(indices < self.samples_per_epoch)
        return {
            "input": x.contiguous(),
            "question": torch.from_numpy(np.stack(questions)),
            "target": torch.tensor(answers, dtype=torch.long),
            "operations": torch.full((self.batch_size,), operations, dtype=torch.long),
            "digits": torch.full((self.batch_size,), digits, dtype=torch.long),
            "valid": valid,
            "key": [f"{self.epoch}/{i}" for i in indices.tolist()],
        }

    def batch_at(self, consumed: int) -> dict[str, Any]:
        return self.batch(consumed // (self.batch_size * self.world_size))

    # --- resume
    def shape_state(self) -> dict[str, Any]:
        return {
            "digit_range": list(self.digit_range),
            "operation_range": list(self.operation_range),
            "repeats": [self.repeats, self.question_repeats],
        }

    def _identity(self) -> dict[str, Any]:
        return {
            "seed": self.seed,
            **self.shape_state(),
            "samples_per_epoch": self.samples_per_epoch,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("format") != STATE_FORMAT:
            raise ValueError(f"not a QAMNIST loader state of format {STATE_FORMAT!r}")
        saved = {k: state.get(k) for k in self._identity()}
        if saved != self._identity():
            raise ValueError(
                f"QAMNIST loader state is for another stream: saved {saved}, now {self._identity()}"
            )
        self.epoch, self._consumed = int(state["epoch"]), int(state["consumed"])


merge_qamnist_states = merge_generated_states
