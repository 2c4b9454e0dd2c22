"""Tools the chaos scenarios use to hurt a run: kill Ray Train workers, take the object store away,
watch the steps a run reports, and read what a run committed straight from storage.

Nothing here imitates a component: workers are real Ray Train worker processes found through the
``workers/rank-N.json`` files the training loop leaves (and checked with psutil before a kill), the
store is the real ``weed mini`` server stopped and started again on the same ports and data, and
committed checkpoints are read from the bucket by the ``COMMIT`` marker contract, not through the
checkpointer's own code.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import socket
import struct
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil

# ---------------------------------------------------------------- results table


@dataclass
class Trial:
    passed: bool
    steps_lost: int | None = None  # steps computed but not committed when the fault hit
    recover_s: float | None = None  # fault -> first new step (or -> clear error) in seconds
    note: str = ""


@dataclass
class ScenarioRecord:
    name: str
    nodeid: str
    trials: list[Trial] = field(default_factory=list)
    outcome: str = "not run"  # pytest's outcome of the test that recorded it

    def trial(
        self,
        passed: bool = True,
        steps_lost: int | None = None,
        recover_s: float | None = None,
        note: str = "",
    ) -> Trial:
        t = Trial(bool(passed), steps_lost, recover_s, note)
        self.trials.append(t)
        return t


RECORDS: list[ScenarioRecord] = []


def summary_rows() -> list[tuple[str, str, str, str, str]]:
    """(scenario, trials, passed, steps lost, time to recover) for the summary table."""
    rows = []
    for r in RECORDS:
        trials = r.trials or [Trial(False)]
        ok = sum(t.passed for t in r.trials) if r.outcome == "passed" else 0
        lost = [t.steps_lost for t in trials if t.steps_lost is not None]
        rec = [t.recover_s for t in trials if t.recover_s is not None]
        lost_s = (
            "-"
            if not lost
            else (str(lost[0]) if len(lost) == 1 else f"{sum(lost)} ({','.join(map(str, lost))})")
        )
        rec_s = (
            "-"
            if not rec
            else (f"{rec[0]:.1f}s" if len(rec) == 1 else f"{min(rec):.1f}-{max(rec):.1f}s")
        )
        status = "" if r.outcome == "passed" else f" [{r.outcome.upper()}]"
        rows.append((r.name, str(len(r.trials)), f"{ok}{status}", lost_s, rec_s))
    return rows


def format_table(rows: list[tuple[str, ...]]) -> list[str]:
    header = ("scenario", "trials", "passed", "steps lost", "time to recover")
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    line = lambda cells: "  ".join(str(c).ljust(w) for c, w in zip(cells, widths))  # noqa: E731
    return [line(header), line(["-" * w for w in widths])] + [line(r) for r in rows]


# ---------------------------------------------------------------- Ray Train worker processes


def worker_files(local_dir: str | os.PathLike, run_name: str) -> Path:
    """Where the training loop records each rank's pid (``ctm_dist.train.loop.run_paths``)."""
    return Path(local_dir).resolve() / "runs" / run_name / "workers"


def is_ray_worker(pid: int) -> bool:
    """True if ``pid`` is alive and is a Ray worker process (not a recycled pid of something else)."""
    try:
        p = psutil.Process(pid)
        if p.status() == psutil.STATUS_ZOMBIE:
            return False
        cmd = " ".join(p.cmdline())
        return "ray::" in p.name() or "ray::" in cmd or "default_worker.py" in cmd
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return False


def worker_pids(local_dir, run_name: str, written_after: float = 0.0) -> dict[int, int]:
    """{rank: pid} of the live Ray Train workers of a run (records written after ``written_after``)."""
    out = {}
    folder = worker_files(local_dir, run_name)
    if not folder.is_dir():
        return out
    for f in folder.glob("rank-*.json"):
        try:
            doc = json.loads(f.read_text())
        except (OSError, ValueError):
            continue
        if doc.get("time", 0) >= written_after and is_ray_worker(int(doc["pid"])):
            out[int(doc["rank"])] = int(doc["pid"])
    return out


def kill_worker(pid: int, sig: int = signal.SIGKILL) -> None:
    if not is_ray_worker(pid):
        raise RuntimeError(f"pid {pid} is not a live Ray worker; refusing to signal it")
    os.kill(pid, sig)


class HeldWorkers:
    """A run's Ray Train worker processes, suspended (SIGSTOP) until ``release()`` (SIGCONT).

    The driver shows a step up to a second after the workers did it, and a tiny run on a fast machine
    does its 16 steps within that second, so a fault aimed at "step N" of the display can land
    anywhere, even after the end. Holding the workers pins the run where it is (nothing advances,
    every rank stopped alike) while the fault is set up; releasing lets it meet the fault.
    """

    def __init__(self, pids: dict[int, int]):
        self.pids = dict(pids)
        self.step: int | None = None  # set by hold_at_step
        self.event_file: Path | None = None
        self._procs = [psutil.Process(pid) for pid in self.pids.values() if is_ray_worker(pid)]
        if len(self._procs) != len(self.pids):
            raise RuntimeError(
                f"not every pid of {self.pids} is a live Ray worker; refusing to suspend"
            )
        for p in self._procs:
            p.suspend()

    def release(self) -> None:
        for p in self._procs:
            try:
                p.resume()
            except psutil.NoSuchProcess:
                pass
        self._procs = []

    def __enter__(self) -> HeldWorkers:
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def hold_workers_at_start(
    local_dir, run_name: str, workers: int, started_after: float, timeout: float = 240.0
) -> HeldWorkers:
    """Wait until all ``workers`` ranks of a launch (records written after ``started_after``) have
    recorded their pids, then suspend them all. Ranks record their pid first thing, before building
    the model or loading a checkpoint, so the run is held before its first step of this launch."""
    pids = wait_until(
        lambda: (
            (p := worker_pids(local_dir, run_name, written_after=started_after))
            and len(p) >= workers
            and p
        ),
        timeout,
        what=f"{workers} workers of {run_name!r} to start",
    )
    return HeldWorkers(pids)


def event_files(local_dir, run_name: str) -> list[Path]:
    """Rank 0's TensorBoard event files of a run, one per worker-group start, oldest first."""
    folder = Path(local_dir).resolve() / "runs" / run_name / "tensorboard"
    return sorted(
        folder.glob("events.out.tfevents.*"), key=lambda f: (int(f.name.split(".")[3]), f.name)
    )


def event_file_pid(path: Path) -> int:
    """The pid of the process that wrote a TensorBoard event file
    (``events.out.tfevents.<time>.<host>.<pid>.<n>``)."""
    return int(path.name.split(".")[-2])


def logged_step(path: Path) -> int:
    """The highest step rank 0 logged in one event file, read while it grows: the file is a
    sequence of TFRecords (length, crc, event, crc) and a record still being written is left for
    the next read. Rank 0 flushes after every log line, so this trails the workers by one write,
    where the driver's display can trail them by a second."""
    from tensorboard.compat.proto.event_pb2 import Event

    data, at, step = path.read_bytes(), 0, 0
    while at + 12 <= len(data):
        (length,) = struct.unpack("<Q", data[at : at + 8])
        end = at + 12 + length + 4
        if end > len(data):
            break
        event = Event.FromString(data[at + 12 : at + 12 + length])
        if event.HasField("summary"):
            step = max(step, int(event.step))
        at = end
    return step


def hold_at_step(
    local_dir,
    run_name: str,
    step: int,
    workers: int,
    started_after: float,
    known_files: set[Path],
    timeout: float = 300.0,
) -> HeldWorkers:
    """Wait until the worker group started after ``started_after`` (wall clock) has logged ``step``
    (in an event file not among ``known_files``), then suspend its workers. ``.step`` of the
    result is the step rank 0 had logged once they were held (``step`` or a little beyond)."""

    def reached():
        fresh = [f for f in event_files(local_dir, run_name) if f not in known_files]
        if fresh and logged_step(fresh[-1]) >= step:
            pids = worker_pids(local_dir, run_name, written_after=started_after)
            # The pid records must be those of the group that wrote the event file (rank 0 wrote
            # both): a record left by a group Ray tore down must not be mistaken for a live rank.
            if len(pids) >= workers and pids.get(0) == event_file_pid(fresh[-1]):
                return fresh[-1], pids
        return None

    path, pids = wait_until(
        reached, timeout, interval=0.02, what=f"{run_name!r} to log step {step}"
    )
    held = HeldWorkers(pids)
    held.step = logged_step(path)
    held.event_file = path
    return held


# ---------------------------------------------------------------- following a run's progress

_STEP = re.compile(r"^step (\d+)/(\d+)")
_RESUME = re.compile(r"resuming from checkpoint at step (\d+)")


class StepStream:
    """A text stream for the driver's progress display (``train(..., stream=...)``).

    Every line is kept with its arrival time; ``on_step(step)`` callbacks fire for each ``step N/M``
    line, which lets a scenario strike at an exact step of a running job.
    """

    def __init__(self, echo=None):
        if echo is None and os.environ.get("CHAOS_ECHO"):
            echo = sys.__stderr__
        self.lines: list[tuple[float, str]] = []
        self.steps: list[tuple[float, int]] = []
        self.resumes: list[tuple[float, int]] = []
        self.callbacks: list = []
        self.echo = echo
        self._buf = ""
        self._lock = threading.Lock()

    def isatty(self) -> bool:
        return False

    def write(self, text: str) -> int:
        with self._lock:
            self._buf += text
            while "\n" in self._buf:
                line, self._buf = self._buf.split("\n", 1)
                self._line(line)
        return len(text)

    def flush(self) -> None:
        pass

    def _line(self, line: str) -> None:
        now = time.monotonic()
        self.lines.append((now, line))
        if self.echo is not None:
            print(f"[run] {line}", file=self.echo, flush=True)
        m = _RESUME.search(line)
        if m:
            self.resumes.append((now, int(m.group(1))))
        m = _STEP.match(line)
        if m:
            step = int(m.group(1))
            self.steps.append((now, step))
            for cb in list(self.callbacks):
                cb(step)

    def first_step_after(self, t: float, above: int | None = None) -> tuple[float, int] | None:
        for ts, step in self.steps:
            if ts > t and (above is None or step > above):
                return ts, step
        return None

    def text(self) -> str:
        return "\n".join(line for _, line in self.lines)


def follow_file(
    path: str | os.PathLike, stream: StepStream, stop: threading.Event
) -> threading.Thread:
    """Feed the lines appended to ``path`` (a launcher's stderr) into ``stream`` until ``stop``."""

    def run():
        with open(path, errors="replace") as f:
            while True:
                chunk = f.read()
                if chunk:
                    stream.write(chunk)
                elif stop.is_set():
                    return
                else:
                    time.sleep(0.05)

    t = threading.Thread(target=run, daemon=True, name="follow-" + Path(path).name)
    t.start()
    return t


# ---------------------------------------------------------------- the object store going away


def stop_store(store) -> None:
    """Stop ``weed mini`` (SIGTERM, as a maintenance restart would); keep its ports and data."""
    ports = dict(store.ports)
    store.stop()
    store.ports = ports


def restart_store(store) -> None:
    """Start ``weed mini`` again on the SAME ports and data dir (``LocalObjectStore.restart``), so the
    endpoint clients hold stays valid; returns once it answers S3 requests."""
    assert store.ports, "restart_store needs a store that was started before"
    store.restart()


class StoreRequests:
    """Listens on a stopped store's S3 port and records the requests clients attempt there:
    ``(monotonic time, method, object path)``, answering none (each connection is closed once its
    request head is read, as a store that went down mid-request does). Once a request whose path
    contains ``until`` has come, the port is closed again, so that the rest of the outage looks to
    clients like a stopped server (connection refused): a dropped connection is retried inside
    s3fs and botocore before our deadline is looked at, so a port that kept dropping would make
    each failed call slower than a refused one. This is how a scenario proves that reads and
    writes were attempted while the store was down, not merely that the run went on afterwards."""

    def __init__(self, port: int, until: str = ""):
        self.requests: list[tuple[float, str, str]] = []
        self.until = until
        self.matched = threading.Event()  # a request for a path containing ``until`` has come
        self._sock = socket.socket()
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind(("127.0.0.1", port))
        self._sock.listen(64)
        self._sock.settimeout(0.1)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True, name="store-requests")
        self._thread.start()

    def _serve(self) -> None:
        try:
            while not self._stop.is_set():
                try:
                    conn, _ = self._sock.accept()
                except OSError:  # the 0.1 s accept timeout: look at the stop flag again
                    continue
                with conn:
                    conn.settimeout(2.0)
                    head = b""
                    try:
                        while b"\r\n\r\n" not in head and len(head) < 65536:
                            chunk = conn.recv(4096)
                            if not chunk:
                                break
                            head += chunk
                    except OSError:
                        pass
                    parts = head.split(b"\r\n", 1)[0].decode("latin-1").split()
                    if len(parts) >= 2:
                        path = parts[1].split("?")[0]
                        self.requests.append((time.monotonic(), parts[0], path))
                        if self.until in path:
                            self.matched.set()
                            return
        finally:
            self._sock.close()

    def close(self) -> list[tuple[float, str, str]]:
        self._stop.set()
        self._thread.join(10)
        return list(self.requests)


class Outage:
    """Take the store down (in a background thread) and bring it back on the same ports.

    The store stays down for ``seconds`` after it has exited and, with ``until``, also until a
    client has attempted a request for a path containing ``until`` (at most ``wait_s`` more), so
    the outage overlaps what it is meant to hit on a fast machine and on a loaded one alike.
    ``down_at``/``stopped_at``/``restart_at``/``up_at`` are monotonic times (``stopped_at``: the
    server has exited; ``restart_at``: it starts again; clients may reach it before ``up_at``,
    which is when our readiness poll noticed). While it is down, :class:`StoreRequests` records the
    requests clients attempt on its S3 port (``requests``, filled once the store restarts).
    ``join()`` waits for the restart and re-raises its error.
    """

    def __init__(self, store, seconds: float, until: str = "", wait_s: float = 120.0):
        self.store, self.seconds, self.until, self.wait_s = store, seconds, until, wait_s
        self.down_at = self.stopped_at = self.restart_at = self.up_at = None
        self.requests: list[tuple[float, str, str]] = []
        self.error: BaseException | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> Outage:
        self._thread = threading.Thread(target=self._run, daemon=True, name="store-outage")
        self._thread.start()
        return self

    def _run(self):
        recorder = None
        try:
            self.down_at = time.monotonic()
            stop_store(self.store)
            recorder = StoreRequests(self.store.ports["s3.port"], self.until)
            self.stopped_at = time.monotonic()
            time.sleep(self.seconds)
            if self.until:
                recorder.matched.wait(self.wait_s)
            self.requests = recorder.close()
            recorder = None
            self.restart_at = time.monotonic()
            restart_store(self.store)
            self.up_at = time.monotonic()
        except BaseException as e:  # surfaced by join()
            self.error = e
        finally:
            if recorder is not None:
                self.requests = recorder.close()

    def join(self, timeout: float = 120.0) -> None:
        self._thread.join(timeout)
        if self._thread.is_alive():
            raise TimeoutError("the store outage thread did not finish")
        if self.error is not None:
            raise self.error

    def attempted(self, method: str | None = None, containing: str = "") -> list[str]:
        """``METHOD path`` of the requests clients attempted while the store was down."""
        return [
            f"{m} {p}"
            for _, m, p in self.requests
            if (method is None or m == method) and containing in p
        ]


# ---------------------------------------------------------------- what a run committed (read raw)


def committed_steps(run_location) -> list[int]:
    """Steps under ``{run}/checkpoints/`` whose ``COMMIT`` marker exists, read from storage directly."""
    ckpts = run_location.child("checkpoints")
    try:
        names = ckpts.list()
    except FileNotFoundError:
        return []
    steps = []
    for name in names:
        m = re.fullmatch(r"step-(\d{9})", name)
        if m and ckpts.exists(f"{name}/COMMIT"):
            steps.append(int(m.group(1)))
    return sorted(steps)


def commit_problems(run_location, step: int) -> list[str]:
    """What is wrong with committed step ``step``, read raw: every file its ``COMMIT`` lists must be
    in the store with the listed size and SHA-256 (empty: the step is whole)."""
    folder = run_location.child("checkpoints").child(f"step-{step:09d}")
    commit = json.loads(folder.read_bytes("COMMIT"))
    present = set(folder.list())
    problems = []
    for name, size in commit["files"].items():
        if name not in present:
            problems.append(f"{name} missing")
            continue
        data = folder.read_bytes(name)
        if len(data) != size or hashlib.sha256(data).hexdigest() != commit["sha256"][name]:
            problems.append(f"{name} differs from COMMIT")
    return problems


def all_checkpoint_dirs(run_location) -> list[str]:
    try:
        return [n for n in run_location.child("checkpoints").list() if n.startswith("step-")]
    except FileNotFoundError:
        return []


def steps_reached_per_attempt(local_dir, run_name: str) -> list[int]:
    """The highest step rank 0 logged in each attempt of a run (one TensorBoard event file per
    worker-group start, in start order): how far training got before each fault."""
    return [logged_step(f) for f in event_files(local_dir, run_name)]


def wait_until(pred, timeout: float, interval: float = 0.1, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while True:
        value = pred()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)
