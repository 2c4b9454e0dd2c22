"""Preemption: SIGTERM to the driver, Slurm's early-warning SIGUSR1 to the driver, SIGTERM to a worker.

Each time the launcher must checkpoint and commit within the grace time and exit 75 ("preempted",
so a wrapper requeues it); the next launch with the same name resumes from that commit. After
all the interruptions the final weights equal the uninterrupted reference run's, bit for bit.
"""

from __future__ import annotations

import signal
import threading
import time

import pytest

import chaos_harness as H
import chaos_runs as R
from chaos_runs import STEPS

EXIT_PREEMPTED = 75
GRACE_S = 60  # the launcher's default grace time; the tiny checkpoint takes far less


def _launch(overrides, ray_session, env, log, stream):
    stop = threading.Event()
    proc = R.launcher(overrides, ray_session, env, log)
    follower = H.follow_file(log, stream, stop)
    return proc, stop, follower


@pytest.mark.timeout(420)
def test_preemption_signals_checkpoint_exit_75_and_resume(reference_run, ray_session, chaos_store, run_bucket,
                                                          demo_data, run_location, tmp_path, rng, s3_env_for,
                                                          scenario):
    env = s3_env_for()
    name = "preempt"
    loc = run_location(name)
    overrides = R.tiny_overrides(name=name, storage=f"s3://{run_bucket}/runs", data=demo_data,
                                 local_dir=tmp_path, steps=STEPS)
    cases = [("SIGTERM to the driver", "driver", signal.SIGTERM),
             ("SIGUSR1 to the driver (Slurm warning)", "driver", signal.SIGUSR1),
             ("SIGTERM to one worker", "worker", signal.SIGTERM)]
    records = {label: scenario(f"preemption: {label}") for label, _, _ in cases}
    stream = H.StepStream()
    resumed_expect = 0
    for i, (label, target, sig) in enumerate(cases):
        log = tmp_path / f"launch-{i}.log"
        log.touch()
        low = max(resumed_expect + 1, 1)
        strike = rng.randint(low, min(low + 2, STEPS - (len(cases) - i)))
        fired: dict = {}

        def on_step(step, proc=None, strike=strike, target=target, sig=sig, fired=fired):
            if fired or step < strike:
                return
            pid = proc_holder["proc"].pid
            if target == "worker":
                pids = H.worker_pids(tmp_path, name, written_after=launched_at)
                if not pids:
                    return
                pid = pids[rng.choice(sorted(pids))]
            fired.update(t=time.monotonic(), step=step, pid=pid, committed=H.committed_steps(loc))
            if target == "worker":
                H.kill_worker(pid, sig)
            else:
                proc_holder["proc"].send_signal(sig)

        proc_holder: dict = {}
        stream.callbacks[:] = [on_step]
        launched_at = time.time()
        proc, stop, follower = _launch(overrides, ray_session, env, log, stream)
        proc_holder["proc"] = proc
        try:
            rc = proc.wait(timeout=300)
        finally:
            stop.set()
            follower.join(5)
            if proc.poll() is None:
                proc.kill()
        text = log.read_text(errors="replace")
        assert fired, f"{label}: the run ended before step {strike}:\n{text[-3000:]}"
        exited = time.monotonic()
        assert rc == EXIT_PREEMPTED, f"{label}: exit {rc}, expected {EXIT_PREEMPTED}:\n{text[-3000:]}"
        assert f"relaunch with --name {name}" in text, text[-2000:]
        committed = H.committed_steps(loc)
        newest = max(committed)
        assert newest >= fired["step"], f"{label}: signalled at step {fired['step']}, newest commit is {newest}"
        assert newest not in fired["committed"], f"{label}: no new checkpoint was committed after the signal"
        assert exited - fired["t"] < GRACE_S, f"{label}: took {exited - fired['t']:.0f}s to exit"
        if i:
            assert f"resuming from checkpoint at step {resumed_expect}" in text, text[-2000:]
        records[label].trial(True, steps_lost=0, recover_s=exited - fired["t"],
                             note=f"signal at step {fired['step']}, committed {newest}")
        resumed_expect = newest

    # The last launch resumes and finishes; the result is the uninterrupted run's, bit for bit.
    log = tmp_path / "launch-final.log"
    log.touch()
    stream.callbacks[:] = []
    proc, stop, follower = _launch(overrides, ray_session, env, log, stream)
    try:
        rc = proc.wait(timeout=300)
    finally:
        stop.set()
        follower.join(5)
    text = log.read_text(errors="replace")
    assert rc == 0, text[-3000:]
    assert f"resuming from checkpoint at step {resumed_expect}" in text, text[-2000:]
    diffs = R.bitwise_differences(R.checkpoint_tensors(loc, STEPS), reference_run["final"])
    assert not diffs, f"{len(diffs)} tensors differ from the uninterrupted run, e.g. {diffs[:5]}"
