"""Preemption: a signal asks the loop to checkpoint, commit and exit with ``EXIT_PREEMPTED`` (75).

Contract
--------
* A scheduler that wants the job gone sends SIGTERM (Kubernetes, ``scancel``, Ray node
  drain) or SIGUSR1 (Slurm ``--signal=B:USR1@60``); the list is configurable.
* :class:`PreemptionHandler` only sets a flag in the signal handler (nothing else is safe
  there). The loop polls ``handler.should_stop()`` once per step; with torch.distributed
  initialised that is an all-reduce, so every rank stops at the SAME step even if only one
  rank got the signal.
* The loop then saves and commits a checkpoint (``handler.checkpoint_and_exit(save)``),
  which must finish within ``grace_seconds`` of the signal (the scheduler's kill delay minus
  a margin: Kubernetes ``terminationGracePeriodSeconds``, Slurm ``KillWait`` / the
  ``@seconds`` of ``--signal``). It then raises :class:`Preempted`; the launcher exits with
  ``exit_code_for(error)`` = ``EXIT_PREEMPTED`` = 75 (``EX_TEMPFAIL``: try again later).
* Wrappers requeue on 75 (``scontrol requeue``, a Kubernetes Job ``podFailurePolicy`` rule
  ``onExitCodes: {operator: In, values: [75]}``/restart) and the relaunch with the same run
  name resumes from the newest COMMIT. Any other non-zero code is a real failure.
* Further signals while saving are absorbed (the flag stays set); SIGKILL after the grace
  time loses only the step being saved: its checkpoint has no COMMIT and stays invisible.

Ray
---
Ray Train (V2, Ray 2.60) runs the training function in a "TrainingThread" inside each
worker actor, not in the main thread, where ``signal.signal`` cannot be called; the actor's
main thread carries Ray's own SIGTERM handler, which ends the process at once. Three ways
reach the workers instead:

* :class:`WorkerSignals` rides in the loop config. Ray unpickles the training function (and
  with it the config) on the actor's MAIN thread before it starts the training thread, so its
  ``__setstate__`` can install a flag-only handler there (:func:`install_worker_signals`).
  A SIGTERM to any one worker process (a node drain, a scheduler signalling every task) then
  sets :func:`worker_signal`, which the loop folds into its all-reduced stop flag. A signal
  that arrives when no training function runs, or again after the grace time, goes to Ray's
  own handler, so a stuck or finished worker still exits.
* The driver (the process Slurm's ``--signal=B:USR1`` or the pod's SIGTERM reaches) relays
  its signals through its progress actor, which rank 0 polls.
* :func:`ray_train_check` polls ``ray.train.get_preemption_info()`` (alpha API), which Ray
  fills when a node of the group is drained for preemption (``ray drain-node``, KubeRay,
  the autoscaler); :func:`marker_check` polls a ``PREEMPT`` marker under the run's storage
  (throttled, one HEAD request per ``interval_s``) for drivers that cannot reach the actor.

:func:`forward_signals` re-sends signals to processes that DO install the handler in their
main thread (``torchrun``/``srun`` tasks, the test children), e.g. from a wrapper script.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from typing import Callable, Iterable

log = logging.getLogger(__name__)

EXIT_PREEMPTED = 75  # EX_TEMPFAIL from sysexits.h
DEFAULT_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


def parse_signals(names: str) -> tuple[int, ...]:
    """``"SIGTERM,SIGUSR1"`` -> the signal numbers."""
    return tuple(signal.Signals[name.strip()] for name in names.split(",") if name.strip())


class Preempted(Exception):
    """Raised after the preemption checkpoint was committed; exit with ``EXIT_PREEMPTED``."""

    def __init__(self, step: int | None = None, signum: int | None = None):
        name = signal.Signals(signum).name if signum else "a preemption request"
        super().__init__(f"preempted by {name} at step {step}; checkpoint committed")
        self.step, self.signum = step, signum


def exit_code_for(error: BaseException) -> int | None:
    """``EXIT_PREEMPTED`` for a :class:`Preempted` error (also wrapped in another exception)."""
    seen = set()
    e: BaseException | None = error
    while e is not None and id(e) not in seen:
        if isinstance(e, Preempted):
            return EXIT_PREEMPTED
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return None


class PreemptionHandler:
    """Turns the given signals into a flag the training loop polls; a context manager.

    Must be installed from the main thread (Python delivers signals there only).
    """

    def __init__(self, signals: Iterable[int] = DEFAULT_SIGNALS, grace_seconds: float = 60.0,
                 checks: Iterable[Callable[[], bool]] = ()):
        self.signals = tuple(int(s) for s in signals)
        self.checks = list(checks)  # polled by should_stop(): Ray drain notices, a storage marker
        self.grace_seconds = float(grace_seconds)
        self.signum: int | None = None
        self.received_at: float | None = None
        self._previous: dict[int, object] = {}

    def install(self) -> "PreemptionHandler":
        if threading.current_thread() is not threading.main_thread():
            raise RuntimeError("PreemptionHandler.install() must run in the main thread")
        for s in self.signals:
            self._previous[s] = signal.signal(s, self._on_signal)
        return self

    def uninstall(self) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous.clear()

    def __enter__(self) -> "PreemptionHandler":
        return self.install()

    def __exit__(self, *exc) -> None:
        self.uninstall()

    def _on_signal(self, signum, frame) -> None:
        if self.signum is None:
            self.signum, self.received_at = signum, time.monotonic()

    def request(self, signum: int = signal.SIGTERM) -> None:
        """Ask for a stop without a signal (tests, a control message from the driver)."""
        self._on_signal(signum, None)

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def should_stop(self) -> bool:
        """True on every rank once any rank got a signal (an all-reduce when distributed)."""
        import torch
        import torch.distributed as dist

        if not self.requested and any(check() for check in self.checks):
            self.request(signal.SIGTERM)
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            backend = dist.get_backend()
            device = "cuda" if backend == "nccl" and torch.cuda.is_available() else "cpu"
            flag = torch.tensor([1 if self.requested else 0], dtype=torch.int32, device=device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            if int(flag.item()) and not self.requested:
                self.request(signal.SIGTERM)  # another rank was signalled
        return self.requested

    def time_left(self) -> float:
        if self.received_at is None:
            return self.grace_seconds
        return self.grace_seconds - (time.monotonic() - self.received_at)

    def checkpoint_and_exit(self, save: Callable[[], object], step: int | None = None) -> None:
        """Run ``save()`` (which commits) and raise :class:`Preempted`; log if the grace time was exceeded."""
        start = time.monotonic()
        save()
        took = time.monotonic() - start
        if self.time_left() < 0:
            log.warning("preemption checkpoint took %.1fs; the grace time of %.0fs was exceeded",
                        took, self.grace_seconds)
        else:
            log.info("preemption checkpoint committed in %.1fs (%.1fs of grace left)", took, self.time_left())
        raise Preempted(step, self.signum)


def forward_signals(pids: Callable[[], Iterable[int]],
                    signals: Iterable[int] = DEFAULT_SIGNALS) -> Callable[[], None]:
    """In a driver process: re-send each of ``signals`` to the processes ``pids()`` lists.

    ``pids`` is called at signal time (workers may start after the handler is installed).
    The driver itself keeps running so it can collect the workers' results; returns a
    function that restores the previous handlers.
    """
    def on_signal(signum, frame):
        for pid in list(pids()):
            if pid == os.getpid():
                continue
            try:
                os.kill(int(pid), signum)
            except ProcessLookupError:
                pass

    return handle_signals(signals, on_signal)


def handle_signals(signals: Iterable[int], handler: Callable) -> Callable[[], None]:
    """Install ``handler`` for ``signals`` (main thread only); returns a function restoring the previous ones."""
    previous = {s: signal.signal(s, handler) for s in signals}

    def restore():
        for s, h in previous.items():
            signal.signal(s, h)

    return restore


STOP_MARKER = "PREEMPT"


def marker_check(run_location, interval_s: float = 5.0, name: str = STOP_MARKER) -> Callable[[], bool]:
    """A check that is True once ``{run}/{name}`` exists; looks at most every ``interval_s`` seconds."""
    last = [float("-inf")]
    seen = [False]

    def check() -> bool:
        if not seen[0] and time.monotonic() - last[0] >= interval_s:
            last[0] = time.monotonic()
            try:
                seen[0] = run_location.exists(name)
            except Exception as e:  # an unreachable store must not stop or kill training
                log.warning("could not look for the stop marker: %s", e)
        return seen[0]

    return check


def request_stop(run_location, reason: str = "preemption", name: str = STOP_MARKER) -> None:
    """Write the stop marker the workers' :func:`marker_check` looks for."""
    import json

    run_location.write_bytes(name, json.dumps({"reason": reason, "time": time.time()}).encode())


def clear_stop_request(run_location, name: str = STOP_MARKER) -> None:
    """Remove a stop marker left by the previous (preempted) attempt."""
    if run_location.exists(name):
        run_location.rm(name)


def request_stop_on_signals(run_location, signals: Iterable[int] = DEFAULT_SIGNALS) -> Callable[[], int | None]:
    """In the driver: on any of ``signals`` write the stop marker (once). Returns a function telling
    which signal arrived (None if none), so the driver can exit ``EXIT_PREEMPTED`` afterwards."""
    received: list[int] = []

    def on_signal(signum, frame):
        if not received:
            received.append(signum)
            request_stop(run_location, reason=signal.Signals(signum).name)

    handle_signals(signals, on_signal)
    return lambda: received[0] if received else None


def ray_train_check() -> Callable[[], bool]:
    """A check that is True once Ray Train reports an imminent preemption of this worker group."""
    import ray.train

    return lambda: ray.train.get_preemption_info() is not None


# ---------------------------------------------------------------- signals in Ray Train workers

_worker_stop: dict = {}       # {"signum", "at"} once a preemption signal reached this process
_ray_handlers: dict = {}      # what the worker's main thread had before us (Ray's own handlers)
_training = threading.Event()  # set while a training function runs in this process
_worker_grace_s = [60.0]


def install_worker_signals(signals: str, grace_seconds: float) -> bool:
    """In a Ray actor's main thread: turn ``signals`` into the :func:`worker_signal` flag.

    Returns False (and changes nothing) off the main thread or outside a Ray actor.
    """
    if threading.current_thread() is not threading.main_thread():
        return False
    try:
        import ray

        if not ray.is_initialized() or ray.get_runtime_context().get_actor_id() is None:
            return False
    except Exception:
        return False
    _worker_grace_s[0] = float(grace_seconds)
    for s in parse_signals(signals):
        previous = signal.signal(s, _on_worker_signal)
        if previous is not _on_worker_signal:
            _ray_handlers[s] = previous
    return True


def _on_worker_signal(signum, frame) -> None:
    first = _worker_stop.get("at")
    overdue = first is not None and time.monotonic() - first > _worker_grace_s[0]
    if _training.is_set() and not overdue:
        _worker_stop.setdefault("signum", signum)
        _worker_stop.setdefault("at", time.monotonic())
        return
    previous = _ray_handlers.get(signum)
    if callable(previous):
        previous(signum, frame)
    elif previous == signal.SIG_DFL:
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)


def worker_signal() -> int | None:
    """The preemption signal this worker process received while training, if any."""
    return _worker_stop.get("signum")


class training_in_progress:
    """Context manager around a worker's training function: signals are flags only inside it."""

    def __enter__(self):
        _worker_stop.clear()
        _training.set()
        return self

    def __exit__(self, *exc):
        _training.clear()


class WorkerSignals:
    """Put one in Ray Train's ``train_loop_config``: unpickling it in a worker installs the handler.

    ``installed`` tells (in the worker) whether that happened on the actor's main thread.
    """

    def __init__(self, signals: str, grace_seconds: float):
        self.signals, self.grace_seconds, self.installed = signals, float(grace_seconds), False

    def __getstate__(self) -> dict:
        return {"signals": self.signals, "grace_seconds": self.grace_seconds}

    def __setstate__(self, state: dict) -> None:
        self.signals, self.grace_seconds = state["signals"], state["grace_seconds"]
        self.installed = install_worker_signals(self.signals, self.grace_seconds)
