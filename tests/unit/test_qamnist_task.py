"""The qamnist task plug-in: its config, loaders, model (CTM or LSTM), loss and metric sums."""

from __future__ import annotations

import pytest
import torch

from ctm_dist.data.qamnist_writer import sklearn_digits_splits, write_qamnist_shards
from ctm_dist.model.qamnist import QAMNISTCTM, QAMNISTLSTM
from ctm_dist.tasks import MetricSums, get_task, make_task
from ctm_dist.train.config import ConfigError, build_config

TINY = [
    "model.d_model=32",
    "model.d_input=8",
    "model.n_synch_out=4",
    "model.n_synch_action=4",
    "model.memory_length=3",
    "model.iterations_for_answering=2",
]

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    root = tmp_path_factory.mktemp("qamnist")
    splits = {k: (v[0][:60], v[1][:60]) for k, v in sklearn_digits_splits(0).items()}
    write_qamnist_shards(str(root), splits, "sklearn-digits", samples_per_shard=32)
    return str(root)


def config(digits, *extra):
    return build_config(
        overrides=[
            "data.task=qamnist",
            f"data.url={digits}",
            "model.preset=qamnist-small",
            "eval.batches=2",
            *TINY,
            *extra,
        ]
    )


@pytest.mark.parametrize("kind, cls", [("ctm", QAMNISTCTM), ("lstm", QAMNISTLSTM)])
def test_task_trains_a_step_and_its_sums_merge(digits, kind, cls):
    task = make_task(config(digits, f"model.kind={kind}"), rank=0, world_size=1)
    model = task.build_model(task.model_config())
    assert type(model) is cls
    batch = next(iter(task.train_loader(6, seed=0)))
    x, target, valid = task.to_device(batch, torch.device("cpu"), torch.float32)
    predictions, certainties = task.forward(model, x)
    loss, tick = task.loss(predictions, certainties, target, valid)
    loss.backward()
    assert torch.isfinite(loss) and tick.max() < 2  # ticks of the answer only
    assert all(p.grad is not None for n, p in model.named_parameters() if "backbone_digit" in n)

    whole, halves = MetricSums(), [MetricSums(), MetricSums()]
    whole.add("samples", valid.sum())
    task.accumulate(whole, predictions.detach(), target, valid, tick)
    for part, rows in zip(halves, (slice(0, 2), slice(2, None))):
        part.add("samples", valid[rows].sum())
        task.accumulate(part, predictions[rows].detach(), target[rows], valid[rows], tick[rows])
    merged = task.summarise(halves[0].merge(halves[1]).reduce()[0], "train")
    assert merged == task.summarise(whole.reduce()[0], "train")
    ops = int(batch["operations"][0])
    assert f"train/accuracy_ops_{ops}" in merged and "train/accuracy" in merged


def test_evaluation_measures_every_number_of_operations(digits):
    task = make_task(config(digits), rank=0, world_size=1)
    sums = MetricSums()
    model = task.build_model(task.model_config()).eval()
    with torch.no_grad():
        for batch in task.eval_loader(4):
            x, target, valid = task.to_device(batch, torch.device("cpu"), torch.float32)
            predictions, certainties = task.forward(model, x)
            _, tick = task.loss(predictions, certainties, target, valid)
            sums.add("samples", valid.sum())
            task.accumulate(sums, predictions, target, valid, tick, eval=True)
    out = task.summarise(sums.reduce()[0], "eval")
    assert {"eval/accuracy_ops_1", "eval/accuracy_ops_2"} <= out.keys()


def test_config_errors_are_one_line(digits):
    with pytest.raises(ConfigError, match="kind must be one of"):
        config(digits, "model.kind=gru")
    with pytest.raises(ConfigError, match="num_operations_delta"):
        config(digits, "model.num_operations_delta=2")
    cfg = config(digits)
    cfg.model.preset = "demo"
    with pytest.raises(ValueError, match="needs a QAMNIST model preset"):
        get_task("qamnist").preflight(cfg)
