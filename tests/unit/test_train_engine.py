"""The DeepSpeed engine under every ZeRO stage, with tick checkpointing, against plain PyTorch.

One process (world size 1, gloo): the first step's loss must equal the model's own loss, and the
loss after one optimizer step must equal plain ``torch.optim.AdamW`` without tick checkpointing,
so recomputing ticks in segments changes nothing under any stage. Under ZeRO-3 each parameter is
gathered once per forward and once per backward, however many ticks run.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ctm_dist.losses import image_classification_loss
from ctm_dist.model import CTM, preset
from ctm_dist.train.config import build_config
from ctm_dist.train.engine import build_engine

TINY = {
    "iterations": 4,
    "d_model": 32,
    "d_input": 16,
    "heads": 2,
    "n_synch_out": 16,
    "n_synch_action": 16,
    "memory_length": 3,
    "memory_hidden_dims": 2,
    "backbone_type": "resnet18-1",
    "dropout": 0.0,
}


def _seed():
    np.random.seed(0)  # the model draws its neuron selection from numpy
    torch.manual_seed(0)


def _batch():
    g = torch.Generator().manual_seed(1)
    return torch.randn(8, 3, 8, 8, generator=g), torch.randint(0, 10, (8,), generator=g)


def _plain_losses(tick_checkpointing: int):
    _seed()
    model = CTM(preset("demo", **TINY, tick_checkpointing=tick_checkpointing))
    opt = torch.optim.AdamW(
        model.parameters(), lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0
    )
    x, y = _batch()
    losses = []
    for _ in range(2):
        p, c, _ = model(x)
        loss, _ = image_classification_loss(p, c, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize(
    "stage, recompute",
    [
        (0, dict(tick_checkpointing=2)),
        (1, dict(tick_checkpointing=2)),
        (2, dict(tick_checkpointing=2)),
        (3, dict(tick_checkpointing=2)),
        (3, dict(recompute_nlms=True)),
    ],
)
def test_zero_stage_with_tick_checkpointing_matches_plain_torch(process_group, stage, recompute):
    cfg = build_config(
        None,
        [
            "scale.workers=1",
            "data.batch_size=8",
            f"deepspeed.zero_stage={stage}",
            "deepspeed.precision=fp32",
            "optim.lr=1e-2",
            "optim.warmup_steps=0",
            "optim.schedule=constant",
        ],
    )
    _seed()
    engine = build_engine(CTM(preset("demo", **TINY, **recompute)), cfg)
    x, y = _batch()
    losses = []
    for _ in range(2):
        p, c, _ = engine(x)
        loss, _ = image_classification_loss(p.float(), c.float(), y)
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
    reference = _plain_losses(tick_checkpointing=0)
    assert losses[0] == pytest.approx(reference[0], rel=1e-5)
    assert losses[1] == pytest.approx(reference[1], rel=1e-4)
    assert losses[1] != pytest.approx(losses[0], rel=1e-4)  # the optimizer step did something
    assert engine.global_steps == 2


PARITY_TINY = [
    "model.iterations=4",
    "model.d_model=32",
    "model.d_input=16",
    "model.heads=2",
    "model.n_synch_out=16",
    "model.n_synch_action=16",
    "model.memory_length=3",
    "model.memory_hidden_dims=2",
]


def test_parity_trains_a_step_in_bf16(process_group):
    """The default precision on the parity task: float +-1 inputs, a 1-d rotational positional embedding."""
    from ctm_dist.tasks import make_task

    cfg = build_config(
        None,
        [
            "scale.workers=1",
            "data.batch_size=8",
            "data.task=parity",
            "model.preset=parity",
            "deepspeed.precision=bf16",
            "optim.lr=1e-2",
            "optim.warmup_steps=0",
            "optim.schedule=constant",
            *PARITY_TINY,
        ],
    )
    task = make_task(cfg, rank=0, world_size=1)
    model_cfg = task.model_config()
    assert model_cfg.positional_embedding_type == "custom-rotational-1d"
    _seed()
    engine = build_engine(CTM(model_cfg), cfg)
    batch = next(iter(task.train_loader(8, seed=0)))
    x, target, valid = task.to_device(batch, torch.device("cpu"), torch.bfloat16)
    assert x.dtype == torch.bfloat16 and target.dtype == torch.int64
    before = engine.module.output_projector[0].weight.detach().clone()
    p, c, _ = engine(x)
    loss, tick = task.loss(p.float(), c.float(), target, valid)
    engine.backward(loss)
    engine.step()
    assert torch.isfinite(loss) and tick.shape == (8,)
    assert engine.global_steps == 1
    after = engine.module.output_projector[0].weight
    assert after.dtype == torch.bfloat16 and not torch.equal(
        after, before
    )  # the optimizer step reached the weights


def _count_parameter_gathers(engine) -> list[int]:
    """Wrap every parameter's ZeRO-3 gather so that each parameter fetched counts once."""
    count = [0]
    for parameter in engine.module.parameters():

        def counted(params, *args, _gather=parameter.all_gather_coalesced, **kwargs):
            params = list(params)
            count[0] += len(params)
            return _gather(params, *args, **kwargs)

        parameter.all_gather_coalesced = counted
    return count


def _count_module_fetches(engine) -> list[int]:
    """Count the module hooks that run ZeRO-3's parameter coordinator (whether or not they all-gather)."""
    count = [0]
    coordinator = engine.optimizer.parameter_offload.get_param_coordinator()
    fetch = coordinator.fetch_sub_module

    def counted(*args, **kwargs):
        count[0] += 1
        return fetch(*args, **kwargs)

    coordinator.fetch_sub_module = counted
    return count


@pytest.mark.parametrize("recompute", [dict(tick_checkpointing=2), dict(recompute_nlms=True)])
def test_zero3_gathers_each_parameter_once_per_forward_and_backward(process_group, recompute):
    """Not once per tick: the tick modules run T times per forward, their parameters are gathered once.

    With one rank DeepSpeed keeps parameters gathered after the first step, so the first step
    (where every parameter starts partitioned) is the one counted.
    """
    cfg = build_config(
        None,
        [
            "scale.workers=1",
            "data.batch_size=8",
            "deepspeed.zero_stage=3",
            "deepspeed.precision=fp32",
            "optim.lr=1e-2",
            "optim.warmup_steps=0",
            "optim.schedule=constant",
        ],
    )
    x, y = _batch()
    counts = {}
    for ticks in (2, 4):
        _seed()
        engine = build_engine(
            CTM(preset("demo", **{**TINY, "iterations": ticks}, **recompute)), cfg
        )
        n_params = len(list(engine.module.parameters()))
        gathered = _count_parameter_gathers(engine)
        fetches = _count_module_fetches(engine)
        p, c, _ = engine(x)
        forward = gathered[0]
        loss, _ = image_classification_loss(p.float(), c.float(), y)
        engine.backward(loss)
        engine.step()
        counts[ticks] = (forward, gathered[0] - forward)
        assert counts[ticks] == (n_params, n_params), counts
        assert fetches[0] == 2, (
            fetches
        )  # the top-level module's forward and backward; no hooks in the tick loop
