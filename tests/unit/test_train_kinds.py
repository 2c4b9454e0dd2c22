"""The training loop with ``model.kind=lstm`` and ``model.kind=ff`` (and their runs and exports
loading back) and with ``model.init_from`` (fine-tuning).

One rank in this process: the real Trainer (DeepSpeed engine, parity or image loaders, loss,
checkpoints on a local directory) for a few steps of tiny models.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from eval_fixtures import write_digit_shards
from safetensors.torch import load_file

import ctm_dist
from ctm_dist.eval.evaluate import EvalRequest, evaluate
from ctm_dist.eval.export import export_run
from ctm_dist.eval.loading import load_model
from ctm_dist.model import FFBaseline, LSTMBaseline
from ctm_dist.storage import Location
from ctm_dist.train.cli import TASK_DEFAULTS
from ctm_dist.train.config import build_config
from ctm_dist.train.init_from import InitError
from ctm_dist.train.loop import Trainer

pytestmark = pytest.mark.usefixtures("process_group", "one_torch_thread")

HUB_LAYOUT = Path(__file__).resolve().parents[1] / "fixtures" / "hub_ctm_parity"


def _config(tmp_path, *overrides: str, base: dict | None = None):
    return build_config(
        None,
        [
            f"run.local_dir={tmp_path / 'local'}",
            f"run.storage={tmp_path / 'store'}",
            "run.name=kinds",
            "run.max_steps=3",
            "run.log_every=1",
            "eval.every=0",
            "eval.batches=1",
            "checkpoint.every=1000",
            "scale.workers=1",
            "data.task=parity",
            "data.batch_size=8",
            "data.eval_batch_size=8",
            *overrides,
        ],
        base=base,
    )


def test_lstm_baseline_trains_in_the_same_loop_on_its_last_tick(tmp_path):
    cfg = _config(
        tmp_path,
        "model.kind=lstm",
        "model.preset=parity-small",
        "model.sequence_length=8",
        "model.d_model=16",
        "model.d_input=8",
        "model.heads=2",
        "model.iterations=4",
    )
    trainer = Trainer(cfg, 0, 1, torch.device("cpu"))
    assert isinstance(trainer.engine.module, LSTMBaseline)
    before = trainer.engine.module.lstm.weight_hh_l0.detach().clone()
    summary = trainer.fit()
    trainer.checkpointer.close()  # as the worker does: the resumed run takes the lease next
    assert summary["step"] == 3 and torch.isfinite(torch.tensor(summary["train/loss"]))
    assert (
        summary["train/most_certain_tick_mean"] == 4
    )  # the reference trains its LSTM on the last tick
    assert not torch.equal(trainer.engine.module.lstm.weight_hh_l0, before)
    # the run and its export load back as the LSTM baseline
    run = tmp_path / "store" / "kinds"
    from_run = load_model(str(run)).model
    assert isinstance(from_run, LSTMBaseline) and from_run.cfg == trainer.model_cfg
    export_run(str(run), str(tmp_path / "export"))
    exported = ctm_dist.load(str(tmp_path / "export"))
    assert isinstance(exported, LSTMBaseline)
    x = torch.randint(0, 2, (2, 8)).float() * 2 - 1
    with torch.no_grad():
        torch.testing.assert_close(exported(x)[0], from_run(x)[0])


def test_init_from_a_hub_layout_starts_from_its_weights_and_architecture(tmp_path):
    cfg = _config(
        tmp_path,
        "model.preset=parity-small",
        "model.sequence_length=8",
        f"model.init_from={HUB_LAYOUT}",
        "deepspeed.precision=fp32",
    )
    trainer = Trainer(cfg, 0, 1, torch.device("cpu"))
    assert (trainer.model_cfg.d_model, trainer.model_cfg.iterations) == (24, 5)  # the layout's
    hub_weights = load_file(str(HUB_LAYOUT / "model.safetensors"))
    own = trainer.engine.module.state_dict()
    for key, value in hub_weights.items():
        torch.testing.assert_close(own[key].to(value.dtype), value, atol=0, rtol=0, msg=key)
    assert trainer.fit()["step"] == 3


def test_init_from_with_another_output_is_one_line(tmp_path):
    cfg = _config(tmp_path, "model.preset=parity-small", f"model.init_from={HUB_LAYOUT}")
    with pytest.raises(InitError, match="this task needs out_dims=32 shaped \\[16, 2\\]") as error:
        Trainer(cfg, 0, 1, torch.device("cpu"))
    assert "\n" not in str(error.value)


def test_ff_baseline_trains_resumes_and_evaluates_as_one_tick(tmp_path):
    data = Location.parse(str(tmp_path / "data"))
    for split in ("train", "val"):
        write_digit_shards(data, split, n=32, size=8)
    overrides = [
        f"data.url={data.url}",
        "data.task=demo",
        "data.image_size=8",
        "model.kind=ff",
        "model.preset=demo",
        "model.d_model=16",
        "eval.every=3",
        "checkpoint.every=3",
    ]
    cfg = _config(tmp_path, *overrides, base=TASK_DEFAULTS["demo"])  # its tick checkpointing too
    trainer = Trainer(cfg, 0, 1, torch.device("cpu"))
    model = trainer.engine.module
    assert isinstance(model, FFBaseline) and trainer.model_cfg.d_model == 16
    before = model.output_projector[6].weight.detach().clone()
    summary = trainer.fit()
    trainer.checkpointer.close()  # as the worker does: the resumed run takes the lease next
    assert summary["step"] == 3 and torch.isfinite(torch.tensor(summary["train/loss"]))
    assert summary["train/most_certain_tick_mean"] == 1  # one tick
    assert "eval/top1" in summary
    assert not torch.equal(model.output_projector[6].weight, before)
    # a longer run of the same name resumes from the committed step
    longer = _config(tmp_path, *overrides, "run.max_steps=4", base=TASK_DEFAULTS["demo"])
    resumed = Trainer(longer, 0, 1, torch.device("cpu"))
    assert resumed.resumed_from == 3 and resumed.fit()["step"] == 4
    resumed.checkpointer.close()
    # the run and its export load back; evaluation reads its one tick, without a halting sweep
    run = tmp_path / "store" / "kinds"
    from_run = load_model(str(run)).model
    assert isinstance(from_run, FFBaseline) and from_run.cfg == trainer.model_cfg
    export_run(str(run), str(tmp_path / "export"))
    exported = ctm_dist.load(str(tmp_path / "export"))
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(exported(x)[0], from_run(x)[0])
    report = evaluate(EvalRequest(str(tmp_path / "export"), data=data.url, batch_size=16))
    assert report["classification"]["samples"] == 32 and report["classification"]["ticks"] == 1
    assert "halting" not in report
