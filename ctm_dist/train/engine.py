"""DeepSpeed engine for one worker: our config -> DeepSpeed's config dict -> ``deepspeed.initialize``."""

from __future__ import annotations

import torch

from ctm_dist.train.config import TrainConfig
from ctm_dist.train.schedule import WarmupCosine


def deepspeed_config(cfg: TrainConfig) -> dict:
    """The DeepSpeed config dict; every value that matters is set explicitly."""
    ds = cfg.deepspeed
    zero: dict = {"stage": ds.zero_stage}
    if ds.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": False}
    if ds.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": False}
    return {
        "train_batch_size": cfg.data.batch_size,
        "train_micro_batch_size_per_gpu": cfg.micro_batch_size,
        "gradient_accumulation_steps": ds.grad_accumulation,
        "gradient_clipping": ds.gradient_clipping,
        "bf16": {"enabled": ds.precision == "bf16"},
        "fp16": {"enabled": ds.precision == "fp16", "initial_scale_power": 16},
        "zero_optimization": zero,
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }


def model_dtype(cfg: TrainConfig) -> torch.dtype:
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[
        cfg.deepspeed.precision
    ]


def lr_schedule(cfg: TrainConfig) -> WarmupCosine:
    o = cfg.optim
    return WarmupCosine(
        o.lr,
        o.warmup_steps,
        o.decay_steps or cfg.run.max_steps,
        o.warmup_start_lr,
        o.min_lr,
        cosine=o.schedule == "cosine",
        linear=o.schedule == "linear",
    )


def gather_once_per_pass(engine) -> None:
    """Under ZeRO-3, gather every parameter once per forward and once per backward.

    ZeRO-3 hooks every submodule: it gathers a module's parameters before each call and
    releases them after it. The CTM calls its tick modules (query projection, attention,
    synapses, neuron-level models) once per tick, so those hooks would run T times per forward
    and again per tick in backward (with tick checkpointing also in the recomputation). Here
    every parameter is registered as an external parameter of the top-level module, which
    gathers them all when its forward starts (and when backward reaches its outputs) and
    releases them when it ends; the submodules' hooks are then removed, so the tick loop runs
    without any. The full parameters are resident for the length of a forward or a backward,
    as under ZeRO-2, while the parameters at rest, gradients and optimizer state stay
    partitioned. Gradients are still reduced per parameter as they become ready.
    """
    import deepspeed

    model = engine.module
    own = {id(p) for p in model.parameters(recurse=False)}
    for parameter in model.parameters():
        if id(parameter) not in own:
            deepspeed.zero.register_external_parameter(model, parameter)
    offload = engine.optimizer.parameter_offload
    top = {id(model._forward_pre_hooks), id(model._forward_hooks)}
    for handles in (offload.forward_hooks, offload.backward_hooks):
        kept = []
        for handle in handles:
            hooks = handle.hooks_dict_ref()
            if hooks is not None and id(hooks) not in top:
                handle.remove()
            else:
                kept.append(handle)
        handles[:] = kept


def build_engine(model: torch.nn.Module, cfg: TrainConfig):
    """Wrap ``model`` in a DeepSpeed engine with AdamW and the warmup+cosine schedule.

    With optimizer offload DeepSpeed builds its own CPU Adam (from the config dict); otherwise
    the engine wraps ``torch.optim.AdamW``. The scheduler is stepped by the engine once per
    optimizer step and saved in its checkpoints.
    """
    import deepspeed

    o = cfg.optim
    ds_cfg = deepspeed_config(cfg)
    model = model.to(
        model_dtype(cfg)
    )  # buffers too (BatchNorm statistics), not only what DeepSpeed casts
    params = [p for p in model.parameters() if p.requires_grad]
    adam = {"lr": o.lr, "betas": list(o.betas), "eps": o.eps, "weight_decay": o.weight_decay}
    if cfg.deepspeed.offload_optimizer:
        ds_cfg["optimizer"] = {"type": "AdamW", "params": adam}
        optimizer = None
    else:
        optimizer = torch.optim.AdamW(
            params, lr=o.lr, betas=tuple(o.betas), eps=o.eps, weight_decay=o.weight_decay
        )
    schedule = lr_schedule(cfg)

    def scheduler(opt):
        return torch.optim.lr_scheduler.LambdaLR(opt, schedule)

    engine, *_ = deepspeed.initialize(
        model=model,
        optimizer=optimizer,
        model_parameters=params if optimizer is None else None,
        lr_scheduler=scheduler,
        config=ds_cfg,
        dist_init_required=False,
    )
    if cfg.deepspeed.zero_stage == 3:
        gather_once_per_pass(engine)
    return engine
