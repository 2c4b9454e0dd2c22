"""Preemption: signal -> flag -> committed checkpoint -> exit 75; signal forwarding for drivers."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from checkpoint_fixtures import MODEL_CONFIG, init_dist, make_engine
from ctm_dist.train.checkpointer import Checkpointer
from ctm_dist.train.preemption import (EXIT_PREEMPTED, PreemptionHandler, Preempted, exit_code_for,
                                       forward_signals)

HERE = Path(__file__).resolve().parent


def test_signal_sets_flag_and_exit_code_contract():
    assert EXIT_PREEMPTED == 75
    before = signal.getsignal(signal.SIGUSR1)
    with PreemptionHandler(signals=[signal.SIGUSR1], grace_seconds=5) as handler:
        assert not handler.should_stop()
        os.kill(os.getpid(), signal.SIGUSR1)
        os.kill(os.getpid(), signal.SIGUSR1)  # a second signal is absorbed, not fatal
        assert handler.should_stop() and handler.signum == signal.SIGUSR1
        assert 0 < handler.time_left() <= 5
        saved = []
        with pytest.raises(Preempted, match="SIGUSR1 at step 12") as info:
            handler.checkpoint_and_exit(lambda: saved.append(True), step=12)
        assert saved == [True]
    assert signal.getsignal(signal.SIGUSR1) is before
    assert exit_code_for(info.value) == 75
    try:
        try:
            raise info.value
        except Preempted as e:
            raise RuntimeError("training failed") from e
    except RuntimeError as wrapped:
        assert exit_code_for(wrapped) == 75
    assert exit_code_for(RuntimeError("disk full")) is None


def test_forward_signals_reaches_worker_process():
    worker = subprocess.Popen(
        [sys.executable, "-c", "import signal, sys, time\n"
         "signal.signal(signal.SIGUSR1, lambda *a: sys.exit(42))\nprint('ready', flush=True)\ntime.sleep(60)"],
        stdout=subprocess.PIPE, text=True)
    try:
        assert worker.stdout.readline().strip() == "ready"
        restore = forward_signals(lambda: [worker.pid], signals=[signal.SIGUSR1])
        try:
            os.kill(os.getpid(), signal.SIGUSR1)  # the driver is signalled; it survives and forwards
        finally:
            restore()
        assert worker.wait(20) == 42
    finally:
        worker.kill()
        worker.wait()


def test_sigterm_commits_checkpoint_and_exits_75(s3_location, object_store):
    run = s3_location.child("run")
    env = dict(os.environ, **object_store.env(), PYTHONPATH=os.pathsep.join([str(HERE.parent), str(HERE)]))
    child = subprocess.Popen([sys.executable, str(HERE / "checkpoint_fixtures.py"), "preempt", f"s3://{run.path}"],
                             env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines, last_step = [], 0
    try:
        for line in child.stdout:
            lines.append(line)
            m = re.match(r"step (\d+)$", line.strip())
            if m:
                last_step = int(m.group(1))
                if last_step == 3:
                    signalled_at = time.monotonic()
                    child.send_signal(signal.SIGTERM)
        rc = child.wait(120)
    finally:
        child.kill()
        child.wait()
    output = "".join(lines[-20:])
    assert rc == EXIT_PREEMPTED, output
    assert "preempted: preempted by SIGTERM" in output
    assert time.monotonic() - signalled_at < 30  # within the configured grace time
    ckpt = Checkpointer(run)
    assert ckpt.committed_steps() == [last_step] and last_step >= 3
    init_dist()
    extra = ckpt.load(make_engine(0, seed=4), config=MODEL_CONFIG)
    assert torch.equal(extra["position"], torch.tensor(last_step))


def test_driver_signal_writes_marker_that_stops_workers(tmp_path):
    from ctm_dist.storage import Location
    from ctm_dist.train.preemption import clear_stop_request, marker_check, request_stop_on_signals

    run = Location.parse(tmp_path / "run")
    before = signal.getsignal(signal.SIGUSR1)
    received = request_stop_on_signals(run, signals=[signal.SIGUSR1])
    try:
        worker = PreemptionHandler(signals=[], checks=[marker_check(run, interval_s=0.0)])
        assert not worker.should_stop() and received() is None
        os.kill(os.getpid(), signal.SIGUSR1)  # the driver is signalled
        assert received() == signal.SIGUSR1 and run.exists("PREEMPT")
        assert worker.should_stop()
    finally:
        signal.signal(signal.SIGUSR1, before)
    clear_stop_request(run)  # what the driver does before relaunching workers
    assert not PreemptionHandler(signals=[], checks=[marker_check(run)]).should_stop()


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
        assert not WorkerSignals("SIGTERM", 1.0).installed  # only unpickling in an actor installs it
    finally:
        if started:
            ray.shutdown()
