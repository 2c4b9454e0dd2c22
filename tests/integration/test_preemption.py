"""Preemption through the loop's one stop path: a signal sets a flag, ``Trainer.fit`` commits a checkpoint
at that step and reports ``preempted``, the launcher's code is 75, and a relaunch resumes from the commit."""

from __future__ import annotations

import os
import signal
import time

import pytest
from cluster_fixtures import TINY_MODEL

from ctm_dist.train.preemption import EXIT_PREEMPTED, Preempted, PreemptionHandler, exit_code_for

TINY_PARITY = [
    "data.task=parity",
    "model.preset=parity",
    "model.sequence_length=8",
    "data.batch_size=4",
    "data.eval_batch_size=4",
    "scale.workers=1",
    "deepspeed.zero_stage=0",
    "deepspeed.precision=fp32",
    "run.log_every=1",
    "checkpoint.every=1000",
    "eval.every=0",
    "eval.batches=1",
    *TINY_MODEL,
]


def test_exit_code_contract():
    assert EXIT_PREEMPTED == 75
    error = Preempted(12, signal.SIGUSR1)
    assert str(error) == "preempted by SIGUSR1 at step 12; checkpoint committed"
    assert exit_code_for(error) == 75
    try:
        try:
            raise error
        except Preempted as e:
            raise RuntimeError("training failed") from e
    except RuntimeError as wrapped:
        assert exit_code_for(wrapped) == 75
    assert exit_code_for(RuntimeError("disk full")) is None


def test_signal_only_sets_a_flag_and_the_previous_handler_comes_back():
    before = signal.getsignal(signal.SIGUSR1)
    with PreemptionHandler(signals=[signal.SIGUSR1]) as handler:
        assert not handler.should_stop()
        os.kill(os.getpid(), signal.SIGUSR1)
        os.kill(os.getpid(), signal.SIGUSR1)  # a second signal is absorbed, not fatal
        assert handler.should_stop() and handler.signum == signal.SIGUSR1
    assert signal.getsignal(signal.SIGUSR1) is before


def test_sigterm_during_fit_commits_that_step_and_the_relaunch_resumes_from_it(
    tmp_path, monkeypatch
):
    """The real loop (DeepSpeed engine, parity data, checkpointer on a local store), signalled after step 3."""
    import torch
    from checkpoint_fixtures import init_dist

    from ctm_dist.train.checkpointer import Checkpointer
    from ctm_dist.train.config import build_config
    from ctm_dist.train.loop import Trainer

    init_dist()
    storage = tmp_path / "store"

    def config(steps):
        return build_config(
            None,
            [
                f"run.local_dir={tmp_path}",
                f"run.storage={storage}",
                "run.name=p",
                f"run.max_steps={steps}",
                *TINY_PARITY,
            ],
        )

    plain_step = Trainer.train_step

    def step_then_signal(self, batches):
        plain_step(self, batches)
        if self.step == 3 and self.resumed_from is None:
            os.kill(
                os.getpid(), signal.SIGTERM
            )  # what a scheduler does; the handler only sets the flag

    monkeypatch.setattr(Trainer, "train_step", step_then_signal)
    before = signal.getsignal(signal.SIGTERM)
    started = time.monotonic()
    summary = Trainer(config(1000), 0, 1, torch.device("cpu")).fit()
    assert summary["preempted"] and summary["signal"] == signal.SIGTERM and summary["step"] == 3
    assert Checkpointer(storage / "p").committed_steps() == [3]
    assert signal.getsignal(signal.SIGTERM) is before  # the loop's handler is gone once fit returns
    assert time.monotonic() - started < 120

    resumed = Trainer(config(5), 0, 1, torch.device("cpu"))
    assert resumed.resumed_from == 3
    summary = resumed.fit()
    assert summary["step"] == 5 and not summary.get("preempted")
    assert Checkpointer(storage / "p").committed_steps() == [3, 5]


def test_worker_signals_flag_while_training_and_leave_rays_handler_otherwise():
    """In a real Ray actor: unpickling WorkerSignals installs the handler on the main thread; a SIGTERM
    while training only sets the flag; one when no training runs still ends the process (Ray's handler)."""
    import ray

    from ctm_dist.train.preemption import WorkerSignals

    @ray.remote(num_cpus=0, max_restarts=0)
    class Worker:
        def install(self, hook):
            return hook.installed

        def signal_while_training(self):
            from ctm_dist.train import preemption

            with preemption.training_in_progress():
                os.kill(os.getpid(), signal.SIGTERM)
                deadline = time.monotonic() + 10
                while preemption.worker_signal() is None and time.monotonic() < deadline:
                    time.sleep(0.05)
                return preemption.worker_signal()

        def signal_idle(self):
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(30)
            return "survived"

    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=1, include_dashboard=False, configure_logging=False)
    try:
        worker = Worker.remote()
        assert ray.get(worker.install.remote(WorkerSignals("SIGTERM,SIGUSR1", 30.0)), timeout=60)
        assert ray.get(worker.signal_while_training.remote(), timeout=60) == signal.SIGTERM
        with pytest.raises(ray.exceptions.RayActorError):
            ray.get(worker.signal_idle.remote(), timeout=60)
        assert not WorkerSignals(
            "SIGTERM", 1.0
        ).installed  # only unpickling in an actor installs it
    finally:
        if started:
            ray.shutdown()
