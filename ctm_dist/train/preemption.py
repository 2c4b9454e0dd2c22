"""Preemption: a signal asks the training loop to checkpoint, commit and exit with ``EXIT_PREEMPTED`` (75).

Contract
--------
* A scheduler that wants the job gone sends SIGTERM (Kubernetes, ``scancel``, Ray node
  drain) or SIGUSR1 (Slurm ``--signal=B:USR1@60``); the list is ``run.preemption_signals``.
  Ctrl-C (SIGINT) at the launcher stops the same way, with exit code 130.
* Signal handlers only set a flag (nothing else is safe there). ``Trainer.fit``
  (:mod:`ctm_dist.train.loop`) asks its ``StopRequests`` once per step; that folds the flag
  into :meth:`PreemptionHandler.should_stop`, an all-reduce when torch.distributed is up, so
  every rank stops at the SAME step even if only one rank was signalled.
* ``fit`` then logs, saves and commits a checkpoint (expected to fit in
  ``run.preemption_grace_s``: the scheduler's kill delay minus a margin, i.e. Kubernetes
  ``terminationGracePeriodSeconds``, Slurm ``KillWait`` / the ``@seconds`` of ``--signal``) and
  returns a summary marked ``preempted``; the driver raises :class:`Preempted` and the launcher
  exits with ``exit_code_for(error)`` = ``EXIT_PREEMPTED`` = 75 (``EX_TEMPFAIL``: try again later).
* Wrappers requeue on 75 (``scontrol requeue``, a Kubernetes Job ``podFailurePolicy`` rule
  ``onExitCodes: {operator: In, values: [75]}``/restart) and the relaunch with the same run
  name resumes from the newest COMMIT. Any other non-zero code is a real failure.
* Further signals while saving are absorbed (the flag stays set); SIGKILL after the grace
  time loses only the step being saved: its checkpoint has no COMMIT and stays invisible.

Ray
---
Ray Train (V2, Ray 2.60) runs the training function in a "TrainingThread" inside each
worker actor, not in the main thread, where ``signal.signal`` cannot be called; the actor's
main thread carries Ray's own SIGTERM handler, which ends the process at once. Two ways reach
the workers instead:

* :class:`WorkerSignals` rides in the loop config. Ray unpickles the training function (and
  with it the config) on the actor's MAIN thread before it starts the training thread, so its
  ``__setstate__`` can install a flag-only handler there (:func:`install_worker_signals`).
  A SIGTERM to any one worker process (a node drain, a scheduler signalling every task) then
  sets :func:`worker_signal`, which the loop folds into its all-reduced stop flag. A signal
  that arrives when no training function runs, or again after the grace time, goes to Ray's
  own handler, so a stuck or finished worker still exits.
* The driver (the process Slurm's ``--signal=B:USR1`` or the pod's SIGTERM reaches) relays
  its signals through its progress actor (:func:`handle_signals`), which rank 0 polls.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable, Iterable

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


def preempted_in(error: BaseException) -> Preempted | None:
    """The :class:`Preempted` error that ``error`` is or wraps (its causes and contexts), if any."""
    seen = set()
    e: BaseException | None = error
    while e is not None and id(e) not in seen:
        if isinstance(e, Preempted):
            return e
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return None


def exit_code_for(error: BaseException) -> int | None:
    """``EXIT_PREEMPTED`` for a :class:`Preempted` error (also wrapped in another exception)."""
    return EXIT_PREEMPTED if preempted_in(error) is not None else None


class PreemptionHandler:
    """Turns the given signals into a flag the training loop polls; a context manager.

    Must be installed from the main thread (Python delivers signals there only).
    """

    def __init__(self, signals: Iterable[int] = DEFAULT_SIGNALS):
        self.signals = tuple(int(s) for s in signals)
        self.signum: int | None = None
        self._previous: dict[int, object] = {}

    def install(self) -> PreemptionHandler:
        if threading.current_thread() is not threading.main_thread():
            raise RuntimeError("PreemptionHandler.install() must run in the main thread")
        for s in self.signals:
            self._previous[s] = signal.signal(s, self._on_signal)
        return self

    def uninstall(self) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous.clear()

    def __enter__(self) -> PreemptionHandler:
        return self.install()

    def __exit__(self, *exc) -> None:
        self.uninstall()

    def _on_signal(self, signum, frame) -> None:
        if self.signum is None:
            self.signum = signum

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

        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            backend = dist.get_backend()
            device = "cuda" if backend == "nccl" and torch.cuda.is_available() else "cpu"
            flag = torch.tensor([1 if self.requested else 0], dtype=torch.int32, device=device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            if int(flag.item()) and not self.requested:
                self.request(signal.SIGTERM)  # another rank was signalled
        return self.requested


def handle_signals(signals: Iterable[int], handler: Callable) -> Callable[[], None]:
    """Install ``handler`` for ``signals`` (main thread only); returns a function restoring the previous ones."""
    previous = {s: signal.signal(s, handler) for s in signals}

    def restore():
        for s, h in previous.items():
            signal.signal(s, h)

    return restore


# ---------------------------------------------------------------- signals in Ray Train workers

_worker_stop: dict = {}  # {"signum", "at"} once a preemption signal reached this process
_ray_handlers: dict = {}  # what the worker's main thread had before us (Ray's own handlers)
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
