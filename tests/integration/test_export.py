"""Export round trips: a real ZeRO-2 / ZeRO-3 checkpoint (1-process DeepSpeed engine on CPU, saved by the
trainer's checkpointer) -> one safetensors file + JSON config, and -> the reference's format; the exported
models give the trained model's outputs, loaded with ``ctm_dist.load`` without DeepSpeed."""

from __future__ import annotations

import json

import pytest
import torch
from eval_fixtures import tiny_config, tiny_ctm

import ctm_dist
from ctm_dist.eval import export, loading, runs
from ctm_dist.model import CTM, EXECUTION_FIELDS, CTMConfig
from ctm_dist.storage import Location
from ctm_dist.storage.checkpoints import NoCheckpoint, NotACheckpoint


def train_and_checkpoint(run_url: str, zero_stage: int, bf16: bool, steps: int = 2):
    """A tiny CTM trained ``steps`` steps by a DeepSpeed engine, checkpointed as the trainer does (its
    COMMIT records the CTMConfig's shape-giving fields as ``config.model``)."""
    import deepspeed

    from ctm_dist.losses import image_classification_loss
    from ctm_dist.train.checkpointer import Checkpointer

    cfg = tiny_config(iterations=3)
    torch.manual_seed(0)
    model = CTM(cfg)
    if bf16:
        model = model.to(torch.bfloat16)
    ds_cfg = {
        "train_micro_batch_size_per_gpu": 4,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": 0.0,
        "bf16": {"enabled": bf16},
        "zero_optimization": {"stage": zero_stage},
        "steps_per_print": 10**9,
    }
    engine, *_ = deepspeed.initialize(
        model=model,
        optimizer=torch.optim.AdamW(model.parameters(), lr=1e-2),
        config=ds_cfg,
        dist_init_required=False,
    )
    dtype = torch.bfloat16 if bf16 else torch.float32
    x = torch.randn(4, 3, 16, 16)
    y = torch.tensor([0, 1, 2, 3])
    for _ in range(steps):
        p, c, _ = engine(x.to(dtype))
        loss, _ = image_classification_loss(p, c, y)
        engine.backward(loss)
        engine.step()
    train_config = {
        "model": {k: v for k, v in cfg.to_dict().items() if k not in EXECUTION_FIELDS},
        "data": {"task": "demo"},
    }
    ckpt = Checkpointer(run_url, keep_last=2)
    ckpt.save(steps, engine, {"note": "test"}, config=train_config)
    ckpt.close()
    engine.eval()
    with torch.no_grad():
        probe = torch.randn(3, 3, 16, 16)
        outputs = engine(probe.to(dtype))
    return engine, probe, [o.float() for o in outputs[:2]]


def test_zero2_bf16_run_exports_to_safetensors_and_reference(tmp_path, process_group):
    run = tmp_path / "runs" / "demo"
    engine, probe, (p_trained, c_trained) = train_and_checkpoint(str(run), zero_stage=2, bf16=True)
    assert runs.committed_steps(Location.parse(str(run))) == [2]

    out = tmp_path / "export"
    export.export_run(str(run), out)
    doc = json.loads((out / export.CONFIG_FILE).read_text())
    assert doc["format"] == export.FORMAT and doc["task"] == "demo" and doc["source"]["step"] == 2
    model = ctm_dist.load(str(out))  # no DeepSpeed, no Ray needed for this
    # the export holds DeepSpeed's fp32 master weights; the engine computes with their bf16 copies.
    with torch.no_grad():
        model(probe)
    trained = dict(engine.module.named_parameters())
    for name, value in model.named_parameters():
        assert torch.equal(value.to(torch.bfloat16), trained[name].detach()), name
        assert value.dtype == torch.float32
    bf16_copy = loading.load(str(out / export.MODEL_FILE)).to(
        torch.bfloat16
    )  # the file alone also loads
    with torch.no_grad():
        p, c, _ = bf16_copy(probe.to(torch.bfloat16))
    assert torch.equal(p.float(), p_trained) and torch.equal(c.float(), c_trained)

    ref = tmp_path / "reference.pt"
    export.export_run(str(run), ref, reference_dataset="cifar10")
    from_ref = ctm_dist.load(str(ref))
    with torch.no_grad():
        assert torch.equal(from_ref(probe)[0], model(probe)[0])


def test_zero3_run_on_s3_exports_with_identical_outputs(
    tmp_path, process_group, s3_location, s3_env
):
    run = s3_location.child("runs/zero3")
    engine, probe, (p_trained, c_trained) = train_and_checkpoint(
        run.url, zero_stage=3, bf16=False, steps=3
    )
    out = s3_location.child("exports/zero3")
    export.export_run(run.url, out)
    model = ctm_dist.load(out.url)
    with torch.no_grad():
        p, c, _ = model(probe)
    assert torch.allclose(p, p_trained, atol=1e-5) and torch.allclose(c, c_trained, atol=1e-5)
    # a run loads directly too (newest committed step), and a missing step is a clear error
    direct = ctm_dist.load(run.url)
    with (
        torch.no_grad()
    ):  # as above (with gradients on, CPU fp32 linears use reordered weights: equal to ~1e-7)
        assert torch.equal(direct(probe)[0], p)
    with pytest.raises(NoCheckpoint, match="step 7"):
        ctm_dist.load(run.url, step=7)
    text = out.read_bytes(export.CONFIG_FILE).decode()
    assert s3_env["AWS_SECRET_ACCESS_KEY"] not in text


def test_consolidated_export_round_trip_and_bad_inputs(tmp_path):
    model = tiny_ctm(seed=5)
    export.save_consolidated(
        model, tmp_path / "e", task="demo", meta={"classes": list("abcdefghij")}
    )
    loaded = loading.load_model(
        str(tmp_path / "e"), iterations=7
    )  # more ticks than trained: same weights
    assert loaded.task == "demo" and loaded.meta["classes"][1] == "b" and loaded.cfg.iterations == 7
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(loaded.model(x)[0][..., :5], model(x)[0])
    with pytest.raises(FileNotFoundError):
        ctm_dist.load(str(tmp_path / "nothing-here"))
    other = tiny_ctm(seed=5, d_model=48)
    with pytest.raises(ValueError, match="do not fit"):
        export.load_weights(other, model.state_dict() | {"extra.weight": torch.zeros(1)})


def test_model_config_is_read_from_the_layout_the_trainer_writes():
    recorded = {
        "config": {
            "model": {
                k: v for k, v in tiny_config().to_dict().items() if k not in EXECUTION_FIELDS
            },
            "data": {"task": "demo"},
        }
    }
    assert CTMConfig.from_dict(runs.model_config_from_commit(recorded)) == tiny_config()
    assert runs.model_config_from_commit({"config": {}}) is None
    assert (
        runs.model_config_from_commit({"config": {"model": {"preset": "demo"}}}) is None
    )  # not what it writes


def test_run_loading_uses_the_trainers_checks_and_falls_back_past_a_damaged_step(
    tmp_path, process_group, caplog
):
    """``ctm_dist.load(run)`` offers only steps the trainer would resume from: a newest step whose
    file no longer matches its COMMIT checksum is skipped (with a warning) for the previous one."""
    run = tmp_path / "runs" / "two-steps"
    train_and_checkpoint(str(run), zero_stage=2, bf16=False, steps=2)
    train_and_checkpoint(str(run), zero_stage=2, bf16=False, steps=3)
    probe = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        at_2 = ctm_dist.load(str(run), step=2)(probe)[0]
        at_3 = ctm_dist.load(str(run))(probe)[0]
    assert not torch.equal(at_2, at_3)
    shard = next((run / "checkpoints" / "step-000000003").glob("*optim_states.pt"))
    data = bytearray(shard.read_bytes())
    data[len(data) // 2 : len(data) // 2 + 4096] = bytes(
        len(data[len(data) // 2 : len(data) // 2 + 4096])
    )
    shard.write_bytes(bytes(data))  # same size: only the checksum tells
    with pytest.raises(NotACheckpoint, match="SHA-256 differs"):
        ctm_dist.load(str(run), step=3)
    with caplog.at_level("WARNING", logger="ctm_dist.eval.runs"), torch.no_grad():
        assert torch.equal(ctm_dist.load(str(run))(probe)[0], at_2)
    assert "using the previous committed step step-000000002" in caplog.text
