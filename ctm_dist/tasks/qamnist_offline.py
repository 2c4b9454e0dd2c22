"""Q&A MNIST offline: held-out questions for evaluation and pictures, the answer-accuracy measure,
and the per-tick certainty/answer charts.

Evaluation asks questions about the digits of a split of the digit shard set (``val``: digits
training never saw), with a fixed seed and the numbers of operations taking turns, so that every
count the model was trained on is measured. The answer is judged as training judges it: at the
most certain of the answer ticks (the LSTM baseline: the last tick).
"""

from __future__ import annotations

import torch

from ctm_dist.data.qamnist import DigitPool, QAMNISTLoader
from ctm_dist.losses.qamnist import answer_ticks_of, correct_by_operations, qamnist_loss
from ctm_dist.model import QAMNISTConfig
from ctm_dist.storage import Location

from .charts import Chart, PictureRequest
from .sums import Measure


def operation_counts(cfg: QAMNISTConfig) -> list[int]:
    """Every number of operations a batch can have: [n - delta, n + delta), or n alone."""
    low, high = (
        cfg.num_operations - cfg.num_operations_delta,
        cfg.num_operations + cfg.num_operations_delta,
    )
    return list(range(low, high)) if high > low else [low]


def question_loader(
    cfg: QAMNISTConfig,
    data: Location | None,
    split: str,
    *,
    batch_size: int,
    seed: int,
    questions: int,
    rank: int = 0,
    world_size: int = 1,
    image_size: int | None = None,
) -> QAMNISTLoader:
    """``questions`` questions (split over the workers) on the digits of ``split``, the model's
    curriculum, every number of operations in turn."""
    if data is None:
        raise ValueError("Q&A MNIST questions need the digit shard set: pass --data URL")
    return QAMNISTLoader.for_model(
        DigitPool.read(data, split),
        cfg,
        batch_size=batch_size,
        rank=rank,
        world_size=world_size,
        seed=seed,
        image_size=image_size,
        samples_per_epoch=questions,
        cycle_operations=True,
    )


def judged_tick(cfg: QAMNISTConfig, predictions, certainties, answers) -> torch.Tensor:
    """The answer tick each question is judged at [B] (indexing the answer ticks), as training."""
    _, tick = qamnist_loss(
        predictions.float(),
        certainties.float(),
        answers,
        cfg.iterations_for_answering,
        use_most_certain=cfg.kind == "ctm",
    )
    return tick


class QAMNISTStats(Measure):
    """Answer accuracy at the judged tick, overall and per number of operations, and per answer
    tick; targets are ``[B, 2]`` (answer, number of operations)."""

    shape = ("counts", "answer_ticks")

    def __init__(self, cfg: QAMNISTConfig):
        super().__init__()
        self.cfg = cfg
        self.counts = operation_counts(cfg)
        self.answer_ticks = cfg.iterations_for_answering

    @torch.no_grad()
    def update(self, predictions, certainties, targets, inputs=None) -> None:
        predictions, certainties = predictions.float().cpu(), certainties.float().cpu()
        answers, operations = targets[:, 0].long().cpu(), targets[:, 1].long().cpu()
        tick = judged_tick(self.cfg, predictions, certainties, answers)
        answer_predictions = answer_ticks_of(predictions, self.answer_ticks)
        correct, questions = correct_by_operations(
            answer_predictions, answers, tick, operations, self.counts
        )
        self.sums.add("correct_by_operations", correct)
        self.sums.add("questions_by_operations", questions)
        self.sums.add("correct", correct.sum())
        per_tick = answer_predictions.argmax(1) == answers[:, None]  # [B, answer ticks]
        self.sums.add("correct_per_answer_tick", per_tick.sum(0))
        self.sums.add("samples", len(answers))

    def summary(self) -> dict:
        n = max(self.n, 1)
        by_ops, questions = {}, {}
        for count, c, q in zip(
            self.counts,
            self.sums["correct_by_operations"].tolist(),
            self.sums["questions_by_operations"].tolist(),
        ):
            questions[str(count)] = int(q)
            if q > 0:
                by_ops[str(count)] = c / q
        return {
            "samples": self.n,
            "accuracy": float(self.sums["correct"][0]) / n,
            "judged_tick": "most certain answer tick" if self.cfg.kind == "ctm" else "last tick",
            "accuracy_by_operations": by_ops,
            "questions_by_operations": questions,
            "accuracy_per_answer_tick": (self.sums["correct_per_answer_tick"] / n).tolist(),
        }


def _phases(digit_ticks: int, question_ticks: int, ticks: int) -> list[tuple[int, int, str]]:
    return [
        (1, digit_ticks, "digits"),
        (digit_ticks + 1, digit_ticks + question_ticks, "question"),
        (digit_ticks + question_ticks + 1, ticks, "answer"),
    ]


@torch.no_grad()
def question_charts(model, data: Location | None, req: PictureRequest) -> list[Chart]:
    """Certainty and accuracy per tick over ``req.count`` questions, and for the first
    ``req.per_input`` questions their certainty, probability of the right answer and answer per
    tick; the digit, question and answer phases shaded."""
    cfg = model.cfg
    loader = question_loader(
        cfg,
        data,
        req.split,
        batch_size=req.count,
        seed=req.seed,
        questions=req.count,
        image_size=req.image_size,
    )
    batch = next(iter(loader))
    images, question = batch["input"].float(), batch["question"]
    answers = batch["target"]
    predictions, certainties, _ = model(images, question)
    ticks = predictions.size(-1)
    spans = _phases(images.size(1), question.size(1), ticks)
    predicted = predictions.argmax(1)  # [B, T]
    tick = judged_tick(cfg, predictions, certainties, answers)
    judged = ticks - cfg.iterations_for_answering + tick  # over all ticks, 0-based
    charts = [
        Chart(
            "certainty_per_tick",
            f"{len(answers)} questions, {int(batch['operations'][0])} operations",
            "tick",
            "fraction",
            {
                "mean certainty": certainties[:, 1].mean(0).tolist(),
                "accuracy": (predicted == answers[:, None]).float().mean(0).tolist(),
            },
            spans=spans,
            ylim=(0.0, 1.0),
        )
    ]
    probabilities = predictions.float().softmax(1)
    for i in range(min(req.per_input, len(answers))):
        answer, t = int(answers[i]), int(judged[i])
        title = (
            f"question {i}: answer {answer}, answered {int(predicted[i, t])} at tick {t + 1} "
            f"(certainty {float(certainties[i, 1, t]):.2f})"
        )
        charts.append(
            Chart(
                f"question_{i}",
                title,
                "tick",
                "value",
                {
                    "certainty": certainties[i, 1].tolist(),
                    "p(right answer)": probabilities[i, answer].tolist(),
                },
                spans=spans,
                ylim=(0.0, 1.0),
            )
        )
        charts.append(
            Chart(
                f"answer_{i}",
                title,
                "tick",
                "answer",
                {
                    "predicted": predicted[i].float().tolist(),
                    "right answer": [float(answer)] * ticks,
                },
                spans=spans,
                ylim=(-0.5, predictions.size(1) - 0.5),
            )
        )
    return charts
