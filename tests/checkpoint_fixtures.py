"""Helpers for the checkpointer tests: a tiny DeepSpeed engine on CPU and the ranks of a 2-rank
gloo group that the tests run and kill. Storage endpoint and keys come from the AWS_* variables.
"""

from __future__ import annotations

import os
import socket
import time

import torch

MODEL_CONFIG = {"model": {"kind": "tiny-mlp", "d_in": 8, "d_hidden": 16, "d_out": 4}}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_dist(rank: int = 0, world_size: int = 1, port: int | None = None) -> None:
    """torch.distributed over gloo through DeepSpeed (no-op if this process already has a group)."""
    import deepspeed
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port or free_port()),
        RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(world_size),
    )
    deepspeed.init_distributed(dist_backend="gloo", verbose=False)


def make_engine(stage: int = 0, seed: int = 0, lr: float = 1e-2):
    """A bf16 DeepSpeed engine over a 2-layer MLP with torch AdamW and a warmup LambdaLR."""
    import deepspeed

    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    params = list(model.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    config = {
        "train_micro_batch_size_per_gpu": 4,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": 0.0,
        "bf16": {"enabled": True},
        "zero_optimization": {"stage": stage},
        "steps_per_print": 2**31 - 1,
    }
    engine, *_ = deepspeed.initialize(
        model=model,
        optimizer=opt,
        config=config,
        dist_init_required=False,
        lr_scheduler=lambda o: torch.optim.lr_scheduler.LambdaLR(
            o, lambda s: min(1.0, (s + 1) / 4)
        ),
    )
    return engine


def batch(step: int, rank: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(1000 * step + rank)
    return torch.randn(4, 8, generator=g).to(torch.bfloat16)


def train_step(engine, step: int, rank: int = 0) -> float:
    x = batch(step, rank)
    loss = ((engine(x).float() - x[:, :4].float()) ** 2).mean()
    engine.backward(loss)
    engine.step()
    return float(loss)


def full_params(engine) -> dict[str, torch.Tensor]:
    """Every parameter as an fp32 copy (gathered under ZeRO-3)."""
    import contextlib

    import deepspeed

    out = {}
    for name, p in engine.module.named_parameters():
        ctx = (
            deepspeed.zero.GatheredParameters([p])
            if hasattr(p, "ds_id")
            else contextlib.nullcontext()
        )
        with ctx:
            out[name] = p.detach().float().clone()
    return out


def _checkpointer(run_url: str, **kw):
    from ctm_dist.storage import Location
    from ctm_dist.train.checkpointer import Checkpointer

    return Checkpointer(Location.parse(run_url), **kw)


def elastic_worker(
    rank: int, world_size: int, port: int, run_url: str, env: dict, params_out: str, local_dir: str
) -> None:
    """One rank of a ZeRO-2 group: agrees on a stop request only rank 1 got, commits step 2,
    then uploads step 3 with a long pause after each file (the test SIGKILLs the group there)."""
    os.environ.update(env)
    init_dist(rank, world_size, port)
    from ctm_dist.storage import Location

    engine = make_engine(stage=2)
    ckpt = _checkpointer(
        run_url, rank=rank, world_size=world_size, local_dir=local_dir, lease_ttl=2.0
    )
    for step in (1, 2):
        train_step(engine, step, rank)
    from ctm_dist.train.preemption import PreemptionHandler

    handler = PreemptionHandler(signals=[])
    assert not handler.should_stop()
    if rank == 1:
        handler.request()  # as if only rank 1 got the signal
    assert handler.should_stop(), "the stop request of rank 1 did not reach every rank"
    ckpt.save(2, engine, {"position": torch.tensor(100 + rank)}, MODEL_CONFIG)
    if rank == 0:
        torch.save(full_params(engine), params_out)
    train_step(engine, 3, rank)
    original = Location.put_file

    def slow_put(self, local_path, name):
        original(self, local_path, name)
        time.sleep(60)

    Location.put_file = slow_put
    ckpt.save(3, engine, {"position": torch.tensor(200 + rank)}, MODEL_CONFIG)
