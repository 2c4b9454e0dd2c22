"""One rank of the real training loop (``ctm_dist.train.loop.Trainer``) on a gloo group, for the
chaos scenarios that kill, signal or resize a run at an exact point without Ray.

Every rank is a process of its own (``python trainer_child.py RANK WORLD PORT SPEC``), so the test
can SIGKILL or SIGTERM one rank or all of them. The model, DeepSpeed engine, shard reader (S3),
augmentation, dropout, checkpointer and lease are the real ones; the training config is
``chaos_runs.tiny_config(**SPEC["run"])``. What this file adds is observation and stopping points,
patched in from the outside:

* ``pauses``: ``[{"rank": r, "at": where, "step": s, ...}]``: the rank prints a ``paused`` line and
  stops itself (SIGSTOP), so the test acts on a process frozen at a known point:
  ``upload`` after the ``files``-th file (``"all"``: the last) this rank uploaded for step ``s``;
  ``commit`` as rank 0 is about to write step ``s``'s COMMIT (every file uploaded); ``prune`` right
  after the first deletion of a pruning pass that follows the commit of step ``s``; ``step`` before
  step ``s`` is computed.
* ``dump_restored``: write the engine's restored state (see :func:`engine_state`) to ``out``.
* ``dump_saved``: steps after whose save the engine's state is written to ``out``.
* ``stop_after``: after the save of this step, release the lease and exit 0 (a run cut short
  without touching its schedule, unlike a smaller ``run.max_steps``).
* ``job``: the lease owner; launches with the same ``job`` act as restarts of one job (as Ray's
  worker-group restarts do), so a killed launch's lease is taken over at once.

Output: ``CHAOS {json}`` lines on stdout: ``started`` (with ``resumed_from``), ``keys`` (the sample
keys of every step, with their ``valid`` flags), ``paused``, ``saved``, ``summary``. Exit 75 when
the run was preempted, as the launchers do.
"""

from __future__ import annotations

import json
import os
import signal
import sys

import chaos_runs as R  # this file's folder is sys.path[0] when it runs as a script
import deepspeed
import torch
import torch.distributed as dist
from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

from ctm_dist.storage import Location
from ctm_dist.storage.checkpoints import COMMIT, step_name
from ctm_dist.tasks import base as tasks
from ctm_dist.train import loop
from ctm_dist.train.checkpointer import Checkpointer
from ctm_dist.train.preemption import EXIT_PREEMPTED


def emit(kind: str, **fields) -> None:
    print("CHAOS " + json.dumps({"kind": kind, **fields}), flush=True)


def pause(where: str, **fields) -> None:
    emit("paused", at=where, **fields)
    os.kill(os.getpid(), signal.SIGSTOP)


def engine_state(engine) -> dict:
    """Every parameter's bf16 weight, fp32 master weight and Adam moments (whole, gathered over the
    ZeRO partitions with DeepSpeed's own accessors; collective), Adam's step count, the lr
    schedule's position and the engine's step counters."""
    out: dict = {"module": {}, "fp32": {}, "exp_avg": {}, "exp_avg_sq": {}}
    for name, p in engine.module.named_parameters():
        out["module"][name] = p.detach().clone()
        out["fp32"][name] = safe_get_full_fp32_param(p).clone()
        for key in ("exp_avg", "exp_avg_sq"):
            out[key][name] = safe_get_full_optimizer_state(p, key).clone()
    base = getattr(engine.optimizer, "optimizer", engine.optimizer)
    out["adam_step"] = sorted(
        {int(s["step"]) for s in base.state.values() if "step" in s}
    )  # one count per flat partition; equal on every rank
    out["lr_scheduler"] = {
        k: v for k, v in engine.lr_scheduler.state_dict().items() if k != "lr_lambdas"
    }
    out["global_steps"] = int(engine.global_steps)
    out["global_samples"] = int(engine.global_samples)
    return out


def dump(engine, rank: int, path: str) -> None:
    state = engine_state(engine)  # collective: every rank takes part
    if rank == 0:
        torch.save(state, path)


def install(spec: dict, rank: int) -> None:
    """Patch the observation and stopping points of ``spec`` into the real classes."""
    mine = [p for p in spec.get("pauses", []) if p["rank"] == rank]
    at = {p["at"]: p for p in mine}
    state = {"step": 0, "pruning_after": None, "uploaded": 0}

    job = spec.get("job")
    if job:
        loop.ray_job_owner = lambda: job

    plain_step = loop.Trainer.train_step

    def train_step(self, batches):
        p = at.get("step")
        if p and self.step + 1 == p["step"]:
            pause("step", step=p["step"], rank=rank)
        state["step"] = self.step + 1
        state["keys"] = []
        plain_step(self, batches)
        emit("keys", step=self.step, rank=rank, keys=state["keys"])

    loop.Trainer.train_step = train_step

    plain_to_device = tasks.Task.to_device

    def to_device(self, batch, device, dtype):
        valid = batch.get("valid")
        flags = [True] * len(batch["key"]) if valid is None else [bool(v) for v in valid.tolist()]
        state.setdefault("keys", []).extend(
            [k, v] for k, v in zip(batch["key"], flags, strict=True)
        )
        return plain_to_device(self, batch, device, dtype)

    tasks.Task.to_device = to_device

    plain_put = Location.put_file

    def put_file(self, local_path, name):
        plain_put(self, local_path, name)
        p = at.get("upload")
        if p and name.startswith(step_name(p["step"]) + "/"):
            state["uploaded"] += 1
            wanted = p["files"]
            if wanted == "all":
                wanted = len(os.listdir(os.path.dirname(os.fspath(local_path))))
            if state["uploaded"] == wanted:
                pause("upload", step=p["step"], rank=rank, files=state["uploaded"], name=name)

    Location.put_file = put_file

    plain_write = Location.write_bytes

    def write_bytes(self, name, data):
        p = at.get("commit")
        if p and name == f"{step_name(p['step'])}/{COMMIT}":
            pause("commit", step=p["step"], rank=rank)
        plain_write(self, name, data)

    Location.write_bytes = write_bytes

    plain_prune = Checkpointer.prune

    def prune(self):
        p = at.get("prune")
        state["pruning_after"] = (
            self.latest_committed() if p and p["step"] <= (self.latest_committed() or 0) else None
        )
        try:
            return plain_prune(self)
        finally:
            state["pruning_after"] = None

    Checkpointer.prune = prune

    plain_rm = Location.rm

    def rm(self, name, recursive=False):
        plain_rm(self, name, recursive)
        if state["pruning_after"] is not None:
            after = state["pruning_after"]
            state["pruning_after"] = None
            at.pop("prune", None)
            pause("prune", step=after, rank=rank, removed=name)

    Location.rm = rm

    plain_save = loop.Trainer.save
    dump_saved = set(spec.get("dump_saved", []))

    def save(self):
        took = plain_save(self)
        emit("saved", step=self.step, rank=rank)
        if self.step in dump_saved:
            dump(self.engine, rank, os.path.join(spec["out"], f"saved-{self.step}.pt"))
        if self.step == spec.get("stop_after"):
            self.checkpointer.close()
            dist.barrier()
            emit("stopped", step=self.step, rank=rank)
            sys.stdout.flush()
            os._exit(0)
        return took

    loop.Trainer.save = save


def main(rank: int, world_size: int, port: int, spec: dict) -> int:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(world_size),
    )
    torch.set_num_threads(1)  # what a Ray worker with one CPU gets (OMP_NUM_THREADS=1)
    deepspeed.init_distributed(dist_backend="gloo", verbose=False)
    install(spec, rank)
    cfg = R.tiny_config(**spec["run"], workers=world_size)
    trainer = loop.Trainer(cfg, rank, world_size, torch.device("cpu"))
    emit("started", rank=rank, resumed_from=trainer.resumed_from)
    if spec.get("dump_restored"):
        dump(trainer.engine, rank, os.path.join(spec["out"], f"restored-{world_size}.pt"))
    try:
        summary = trainer.fit()
    finally:
        trainer.checkpointer.close()
    emit(
        "summary",
        rank=rank,
        step=summary["step"],
        preempted=bool(summary.get("preempted")),
        resumed_from=summary.get("resumed_from"),
    )
    return EXIT_PREEMPTED if summary.get("preempted") else 0


if __name__ == "__main__":
    sys.exit(main(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), json.loads(sys.argv[4])))
