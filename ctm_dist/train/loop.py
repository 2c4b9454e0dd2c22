"""The one training loop: runs inside every Ray Train worker with a DeepSpeed engine.

Per step: ``grad_accumulation`` micro-batches through the engine (DeepSpeed steps the optimizer and
the lr schedule at the boundary). Every ``run.log_every`` steps the ranks reduce their metric sums
and rank 0 writes TensorBoard and tells the driver; every ``eval.every`` steps all ranks evaluate
on the validation split; every ``checkpoint.every`` steps (and at the end) the Checkpointer saves
model, optimizer, schedule, data position and RNG. A restarted or relaunched worker group resumes
from the newest committed checkpoint.
"""

from __future__ import annotations

import json
import logging
import os
import random
import signal
import socket
import time

import numpy as np
import torch
import torch.distributed as dist

from ctm_dist.model import EXECUTION_FIELDS, CTMConfig, execution
from ctm_dist.storage import Location
from ctm_dist.tasks import MetricSums, make_task
from ctm_dist.train import rng
from ctm_dist.train.checkpointer import Checkpointer
from ctm_dist.train.config import TrainConfig
from ctm_dist.train.engine import build_engine, model_dtype
from ctm_dist.train.init_from import initial_model
from ctm_dist.train.lease import ray_job_owner
from ctm_dist.train.metrics import (
    StepTimer,
    TensorBoardLog,
    config_text,
    peak_memory_gib,
)
from ctm_dist.train.preemption import (
    PreemptionHandler,
    parse_signals,
    training_in_progress,
    worker_signal,
)

log = logging.getLogger(__name__)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def run_paths(cfg: TrainConfig) -> dict:
    """Where a run keeps things: its storage location URL and its local scratch directory."""
    local = os.path.join(os.path.abspath(cfg.run.local_dir), "runs", cfg.run.name)
    return {
        "local": local,
        "tensorboard": os.path.join(local, "tensorboard"),
        "workers": os.path.join(local, "workers"),
    }


class Trainer:
    """State and steps of one worker; ``fit()`` runs the whole loop."""

    def __init__(
        self, cfg: TrainConfig, rank: int, world_size: int, device: torch.device, progress=None
    ):
        self.cfg, self.rank, self.world_size, self.device, self.progress = (
            cfg,
            rank,
            world_size,
            device,
            progress,
        )
        self.paths = run_paths(cfg)
        self._record_worker()
        seed_everything(cfg.run.seed)  # same initial weights on every rank
        self.task = make_task(cfg, rank, world_size)
        self.model_cfg = self.task.model_config()
        if cfg.model.init_from:  # fine-tuning: the checkpoint's architecture and weights
            self.model_cfg, model = initial_model(
                cfg.model.init_from, cfg.model.kind, self.model_cfg
            )
        else:
            model = self.task.build_model(self.model_cfg)
        self.engine = build_engine(model.to(device), cfg)
        self.task.bind_model(self.engine)  # a task that acts with the model (RL rollouts) keeps it
        self.compiled = compile_engine(self.engine, self.model_cfg, device)
        self.dtype = model_dtype(cfg)
        self.run_location = Location.parse(
            cfg.run.storage, retry_deadline=cfg.run.storage_retry_deadline
        ).child(cfg.run.name)
        self.checkpointer = Checkpointer(
            self.run_location,
            keep_last=cfg.checkpoint.keep,
            rank=rank,
            world_size=world_size,
            local_dir=os.path.join(self.paths["local"], "scratch"),
            owner=ray_job_owner(),
        )
        self.checkpointer.acquire()  # one job writes a run: a second one with the same name stops here
        # what must match on resume: the model's shape-giving fields (not how ticks are recomputed)
        model_fields = {
            k: v for k, v in self.model_cfg.to_dict().items() if k not in EXECUTION_FIELDS
        }
        self.checkpoint_config = dict(cfg.to_dict(), model=model_fields)
        self.train_data = self.task.train_loader(cfg.micro_batch_size, seed=cfg.run.seed)
        self.step = 0
        self.resumed_from = None
        restored = self.checkpointer.load_latest(
            self.engine, config=self.checkpoint_config, all_ranks=True
        )
        if restored is not None:
            self.step, extras = restored
            self.resumed_from = self.step
            mine = extras[rank] if len(extras) == world_size else extras[0]
            self.train_data.load_state_dict(
                mine["data"]
            )  # every rank saved the merged position of all
            if len(extras) == world_size:
                rng.restore(mine["rng"])
            else:  # another world size: positions carry over, random streams start afresh
                seed_everything(cfg.run.seed + 1000003 * (rank + 1) + self.step)
        else:
            # Different ranks draw different randomness (dropout, augmentation) from here on.
            seed_everything(cfg.run.seed + 1000003 * (rank + 1))
        self.tb = (
            TensorBoardLog(self.paths["tensorboard"], start_step=self.step) if rank == 0 else None
        )
        if self.tb is not None:
            self.tb.text("config", config_text(cfg), self.step)
        self.sums = MetricSums()
        self.timer = StepTimer()
        self.last: dict = {}
        self._steps_since_log = 0

    def _record_worker(self) -> None:
        """Leave ``workers/rank-N.json`` (host, pid) so operators can find each worker process."""
        os.makedirs(self.paths["workers"], exist_ok=True)
        path = os.path.join(self.paths["workers"], f"rank-{self.rank}.json")
        with open(path + ".tmp", "w") as f:
            json.dump(
                {
                    "rank": self.rank,
                    "pid": os.getpid(),
                    "host": socket.gethostname(),
                    "time": time.time(),
                },
                f,
            )
        os.replace(path + ".tmp", path)

    # ------------------------------------------------------------ steps

    def train_step(self, batches) -> None:
        self.engine.train()
        for _ in range(self.cfg.deepspeed.grad_accumulation):
            t0 = time.perf_counter()
            batch = next(batches)
            self.timer.add("data_wait", time.perf_counter() - t0)
            loss = self.task.training_loss(self.engine, batch, self.sums, self.device, self.dtype)
            self.engine.backward(loss)
            self.engine.step()
        self.step += 1

    @torch.no_grad()
    def evaluate(self) -> dict:
        self.engine.eval()
        played = self.task.evaluate_model(self.engine, self.device)
        if played is not None:  # a task that evaluates by acting (RL)
            self.engine.train()
            return played
        sums = MetricSums()
        max_batches = self.cfg.eval.batches or None
        for i, batch in enumerate(
            self.task.eval_loader(self.cfg.data.eval_batch_size // self.world_size)
        ):
            if max_batches is not None and i >= max_batches:
                break
            x, target, valid = self.task.to_device(batch, self.device, self.dtype)
            predictions, certainties = self.task.forward(self.engine, x)
            loss, tick = self.task.loss(predictions.float(), certainties.float(), target, valid)
            sums.add("samples", valid.sum())
            sums.add("loss_sum", loss * valid.sum())
            self.task.accumulate(sums, predictions.float(), target, valid, tick, eval=True)
            sums.add_ticks(tick[valid.bool()])
        reduced, ticks = sums.reduce()
        self.engine.train()
        out = self.task.summarise(reduced, "eval")
        if ticks.numel():
            out["eval/most_certain_tick_mean"] = (
                ticks.double().mean().item() + 1
            )  # ticks numbered 1..T
        out["eval/samples"] = float(reduced.get("samples", torch.zeros(1))[0])
        if "loss_sum" in reduced:
            out["eval/loss"] = float(reduced["loss_sum"][0]) / max(out["eval/samples"], 1.0)
        return out

    def log(self, extra: dict | None = None) -> dict:
        reduced, ticks = self.sums.reduce()
        self.sums.clear()
        phases, elapsed = self.timer.take()
        samples = float(reduced["samples"][0])
        steps = max(self._steps_since_log, 1)
        values = {
            "train/loss": float(reduced["loss_sum"][0]) / max(samples, 1.0),
            "train/lr": float(self.engine.get_lr()[0]),
            "perf/samples_per_s": samples / max(elapsed, 1e-9),
            "perf/step_time_s": elapsed / steps,
            "perf/data_wait_s": phases.get("data_wait", 0.0) / steps,
            "perf/peak_memory_gib": peak_memory_gib(self.device),  # rank 0's
        }
        skipped = getattr(self.train_data, "stats", {}).get("skipped", 0)
        if skipped:
            values["data/skipped_samples"] = float(
                skipped
            )  # this rank's corrupt or unreadable samples
        grad_norm = self.engine.get_global_grad_norm()
        if grad_norm is not None:
            values["train/grad_norm"] = float(grad_norm)
        values.update(self.task.summarise(reduced, "train"))
        if ticks.numel():
            values["train/most_certain_tick_mean"] = ticks.double().mean().item() + 1
        if extra:
            values.update(extra)
        if self.tb is not None:
            scalars = {k: v for k, v in values.items() if not isinstance(v, (list, tuple))}
            self.tb.scalars(scalars, self.step)
            for k, v in values.items():
                if isinstance(v, (list, tuple)):  # per-tick accuracy: one scalar per tick
                    for t, value in enumerate(
                        v, start=1
                    ):  # ticks numbered 1..T, as in the pictures
                        self.tb.writer.add_scalar(f"{k}/tick_{t:03d}", value, self.step)
            self.tb.histogram(
                "train/most_certain_tick", ticks + 1, self.step, bins=self.model_cfg.iterations
            )
            self.tb.flush()
        self._steps_since_log = 0
        return values

    def save(self) -> float:
        t0 = time.perf_counter()
        extra = {"data": self.train_data.global_state_dict(), "rng": rng.capture()}
        self.checkpointer.save(self.step, self.engine, extra, config=self.checkpoint_config)
        if self.tb is not None:
            self.tb.sync(self.run_location.child("tensorboard"))
        return time.perf_counter() - t0

    def report(self, values: dict, final: bool = False) -> None:
        self.last.update(values)
        if self.rank == 0 and self.progress is not None:
            payload = {k: v for k, v in values.items() if not isinstance(v, (list, tuple))}
            payload["step"] = self.step
            payload["final"] = final
            self.progress.update.remote(payload)

    # ------------------------------------------------------------ loop

    def fit(self) -> dict:
        cfg = self.cfg
        max_steps = cfg.run.max_steps
        started, start_step = time.perf_counter(), self.step
        self._steps_since_log = 0
        if self.rank == 0 and self.progress is not None:
            self.progress.update.remote(
                {"step": self.step, "resumed_from": self.resumed_from, "max_steps": max_steps}
            )
        batches = forever(self.train_data)
        pending: dict = {}
        preemption = StopRequests(self.cfg, self.progress if self.rank == 0 else None)
        preempted = None
        while self.step < max_steps:
            t0 = time.perf_counter()
            self.train_step(batches)
            self._steps_since_log += 1
            self.timer.add("step", time.perf_counter() - t0)
            if self.compiled and self.step == start_step + 1 and self.rank == 0:
                log.info("compiled the model in %.1f s (first step)", time.perf_counter() - t0)
            if preemption.should_stop():
                preempted = {"preempted": True, "signal": preemption.handler.signum}
                t_save = time.perf_counter()
                self.report(self.log(pending))
                self.save()
                pending = {"checkpoint/save_s": time.perf_counter() - t_save}
                break
            last = self.step == max_steps
            evaluate = (cfg.eval.every and self.step % cfg.eval.every == 0) or last
            if evaluate:
                pending.update(self.evaluate())
            checkpoint = self.step % cfg.checkpoint.every == 0 or last
            # Log before saving: a crash after the commit then loses no step's log line.
            if self.step % cfg.run.log_every == 0 or last or checkpoint or evaluate:
                self.report(self.log(pending))
                pending = {}
            if checkpoint:
                pending["checkpoint/save_s"] = self.save()  # shows up in the next log line
        preemption.handler.uninstall()
        if self.tb is not None:
            if pending:  # the last save's time
                self.tb.scalars(pending, self.step)
            self.tb.sync(self.run_location.child("tensorboard"))
            self.tb.close()
        self.last.update(pending)
        trained = self.step - start_step
        summary = dict(self.last)
        summary.update(
            {
                "step": self.step,
                "resumed_from": self.resumed_from,
                "steps_per_s": trained / max(time.perf_counter() - started, 1e-9),
                "tensorboard_local": self.paths["tensorboard"],
                "tensorboard": self.run_location.child("tensorboard").url,
                "checkpoints": self.checkpointer.location.url,
            }
        )
        if preempted:
            summary.update(preempted)
        self.report(summary, final=True)
        return summary


class StopRequests:
    """The one stop path of ``Trainer.fit``: a signal to this process, or a stop the driver relays via ``progress``.

    In a Ray worker the training function runs off the main thread, where signal handlers cannot be
    installed; :class:`~ctm_dist.train.preemption.WorkerSignals` installed a flag on the main thread
    instead, and the driver (which gets the scheduler's signal) forwards its own through its progress
    actor. Run on a main thread (no Ray), the handler goes straight onto the process's signals.
    Rank 0 polls the relay without blocking, and ``should_stop`` agrees on every rank (an all-reduce).
    """

    def __init__(self, cfg: TrainConfig, progress=None):
        self.handler = PreemptionHandler(parse_signals(cfg.run.preemption_signals))
        try:
            self.handler.install()
        except (RuntimeError, ValueError):  # not the main thread: rely on the driver's relay
            pass
        self.progress = progress
        self._pending = progress.stop_requested.remote() if progress is not None else None

    def should_stop(self) -> bool:
        signum = None if self.handler.requested else worker_signal()
        if signum:
            log.warning(
                "this worker got %s: checkpointing and stopping every rank",
                signal.Signals(signum).name,
            )
            self.handler.request(signum)
        if self._pending is not None and not self.handler.requested:
            import ray

            ready, _ = ray.wait([self._pending], timeout=0)
            if ready:
                signum = ray.get(self._pending)
                if signum:
                    self.handler.request(signum)
                else:
                    self._pending = self.progress.stop_requested.remote()
        return self.handler.should_stop()


def compile_engine(engine, model_cfg, device: torch.device) -> bool:
    """``torch.compile`` the engine's model where ``model.compile`` says so for ``device``; whether it did."""
    if not isinstance(model_cfg, CTMConfig) or not execution.compiles(model_cfg, device):
        return False
    execution.prepare(engine.module)
    engine.compile(
        backend=execution.COMPILE_BACKEND, compile_kwargs=execution.compile_options(model_cfg)
    )
    return True


def forever(loader):
    """Batches across epochs: each pass over ``loader`` is one epoch and the next pass starts the next."""
    while True:
        empty = True
        for batch in loader:
            empty = False
            yield batch
        if empty:
            raise RuntimeError("the training loader yielded no batch for a whole epoch")


def train_worker(loop_config: dict) -> None:
    """Ray Train entry point (``train_loop_per_worker``)."""
    import ray
    import ray.train
    import ray.train.torch

    cfg = TrainConfig.from_dict(loop_config["config"])
    if loop_config.get("credentials") is not None:
        os.environ.update(
            ray.get(loop_config["credentials"])
        )  # storage endpoint and keys, never logged
    logging.getLogger("DeepSpeed").setLevel(
        logging.WARNING
    )  # its per-step INFO lines drown the progress
    ctx = ray.train.get_context()
    device = ray.train.torch.get_device()
    threads = int(os.environ.get("OMP_NUM_THREADS", "0") or 0)
    if threads > 0:
        torch.set_num_threads(threads)
    with training_in_progress():
        trainer = Trainer(
            cfg, ctx.get_world_rank(), ctx.get_world_size(), device, loop_config.get("progress")
        )
        try:
            summary = trainer.fit()
        finally:
            trainer.checkpointer.close()  # done or preempted: a relaunch must not wait for the lease
    ray.train.report(
        {k: v for k, v in summary.items() if isinstance(v, (int, float, str)) and v is not None}
    )
    if dist.is_initialized():
        dist.barrier()
