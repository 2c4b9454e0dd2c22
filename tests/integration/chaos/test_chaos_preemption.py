"""Preemption: SIGTERM to the driver, Slurm's early-warning SIGUSR1 to the driver, SIGTERM to a worker,
one after the other on the same run.

Each time the launcher must checkpoint and commit within the grace time and exit 75 ("preempted",
so a wrapper requeues it); the next launch with the same name resumes from that commit. After
all the interruptions the final weights equal the uninterrupted reference run's, bit for bit.

The signal is sent while the launch's workers are held (suspended) before their first step, so
the run stops a step or two after where it resumed on any machine; a signal that arrives only
once the last step is done ends the run normally (exit 0, see docs/fault-tolerance.md).
"""

from __future__ import annotations

import signal
import threading
import time

import chaos_harness as H
import chaos_runs as R
import pytest
from chaos_runs import STEPS

EXIT_PREEMPTED = 75
GRACE_S = 60  # the launcher's default grace time; the tiny checkpoint takes far less
WORKERS = 2  # R.tiny_overrides' default
RELAYED = (
    "asking the workers to checkpoint and stop"  # the driver's log line once it relayed a signal
)


def _launch(overrides, ray_session, env, log, stream):
    stop = threading.Event()
    proc = R.launcher(overrides, ray_session, env, log)
    follower = H.follow_file(log, stream, stop)
    return proc, stop, follower


def _preempt_once(
    *,
    label,
    target,
    sig,
    name,
    overrides,
    ray_session,
    env,
    tmp_path,
    loc,
    rng,
    stream,
    index,
    resumed_expect,
):
    """Launch, hold the workers before their first step, send ``sig`` to the driver or to one worker,
    release them; expect exit 75 and a new commit after the step the run was held at.

    Held, the run cannot finish before the signal takes effect however fast the machine is: it
    stops within a step or two of ``resumed_expect`` (a step line from the driver can trail the
    workers by a second, which a tiny run on a fast machine needs for all of its steps).
    Returns (trial facts, newest committed step)."""
    log = tmp_path / f"launch-{name}-{index}.log"
    log.touch()
    stream.callbacks[:] = []
    proc, stop, follower = _launch(overrides, ray_session, env, log, stream)
    launched_at = time.time()
    fired: dict = {}
    try:
        with H.hold_workers_at_start(
            tmp_path, name, WORKERS, started_after=launched_at - 1
        ) as held:
            pid = held.pids[rng.choice(sorted(held.pids))] if target == "worker" else proc.pid
            fired.update(
                t=time.monotonic(),
                pid=pid,
                committed=H.committed_steps(loc),
                step=max([s for _, s in stream.steps] + [resumed_expect]),
            )
            if target == "worker":
                H.kill_worker(
                    pid, sig
                )  # pending while the worker is stopped, handled when it runs again
            else:
                proc.send_signal(sig)
                # the driver relays the signal through its progress actor; release once it has
                H.wait_until(
                    lambda: RELAYED in log.read_text(errors="replace"),
                    60,
                    what="the driver's relay",
                )
        rc = proc.wait(timeout=300)
    finally:
        stop.set()
        follower.join(5)
        if proc.poll() is None:
            proc.kill()
    exited = time.monotonic()
    text = log.read_text(errors="replace")
    assert rc == EXIT_PREEMPTED, f"{label}: exit {rc}, expected {EXIT_PREEMPTED}:\n{text[-3000:]}"
    assert f"relaunch with --name {name}" in text, text[-2000:]
    if resumed_expect:
        assert f"resuming from checkpoint at step {resumed_expect}" in text, text[-2000:]
    committed = H.committed_steps(loc)
    newest = max(committed)
    assert newest > fired["step"], (
        f"{label}: held at step {fired['step']}, newest commit is {newest}"
    )
    assert newest not in fired["committed"], (
        f"{label}: no new checkpoint was committed after the signal"
    )
    assert newest < STEPS, (
        f"{label}: the run reached its last step {STEPS}; the signal came too late"
    )
    assert set(fired["committed"]) <= set(committed), f"{label}: a committed checkpoint disappeared"
    assert exited - fired["t"] < GRACE_S, f"{label}: took {exited - fired['t']:.0f}s to exit"
    reached = H.steps_reached_per_attempt(tmp_path, name)[-1]  # rank 0's last step of this launch
    return {"exit_s": exited - fired["t"], "step": fired["step"], "reached": reached}, newest


PREEMPTIONS = (  # (scenario label, whom the signal goes to, signal), in launch order
    ("SIGTERM to the driver", "driver", signal.SIGTERM),
    ("SIGUSR1 to the driver (Slurm warning)", "driver", signal.SIGUSR1),
    ("SIGTERM to one worker", "worker", signal.SIGTERM),
)


@pytest.mark.timeout(900)  # the first test to use reference_run also pays for it
def test_preemptions_checkpoint_exit_75_and_the_resume_is_bitwise(
    reference_run,
    ray_session,
    run_bucket,
    demo_data,
    run_location,
    tmp_path,
    rng,
    s3_env_for,
    scenario,
):
    """SIGTERM, then Slurm's SIGUSR1, to the launcher, then SIGTERM to one Ray worker (a node drain):
    each launch checkpoints and exits 75; the fourth launch resumes from the worker's preemption
    checkpoint and finishes with the uninterrupted run's final weights, bit for bit."""
    env = s3_env_for()
    name = "preempt"
    loc = run_location(name)
    overrides = R.tiny_overrides(
        name=name,
        storage=f"s3://{run_bucket}/runs",
        data=demo_data,
        local_dir=tmp_path,
        steps=STEPS,
    )
    stream = H.StepStream()
    resumed = 0
    for i, (label, target, sig) in enumerate(PREEMPTIONS):
        rec = scenario(f"preemption: {label}")
        facts, resumed = _preempt_once(
            label=label,
            target=target,
            sig=sig,
            name=name,
            overrides=overrides,
            ray_session=ray_session,
            env=env,
            tmp_path=tmp_path,
            loc=loc,
            rng=rng,
            stream=stream,
            index=i,
            resumed_expect=resumed,
        )
        rec.trial(
            True,
            steps_lost=facts["reached"] - resumed,
            recover_s=facts["exit_s"],
            note=f"signal at step {facts['step']}, committed {resumed}",
        )

    rec = scenario("resume after preemption: bitwise = uninterrupted")
    log = tmp_path / "launch-final.log"
    log.touch()
    stream.callbacks[:] = []
    t0 = time.monotonic()
    proc, stop, follower = _launch(overrides, ray_session, env, log, stream)
    try:
        rc = proc.wait(timeout=300)
    finally:
        stop.set()
        follower.join(5)
    text = log.read_text(errors="replace")
    assert rc == 0, text[-3000:]
    assert f"resuming from checkpoint at step {resumed}" in text, text[-2000:]
    diffs = R.bitwise_differences(R.checkpoint_tensors(loc, STEPS), reference_run["final"])
    assert not diffs, f"{len(diffs)} tensors differ from the uninterrupted run, e.g. {diffs[:5]}"
    first = stream.first_step_after(t0, above=resumed)
    rec.trial(
        True,
        steps_lost=resumed - (first[1] - 1) if first else None,
        recover_s=(first[0] - t0) if first else None,
        note=f"from step {resumed}",
    )
