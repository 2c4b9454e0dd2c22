"""One writer per run: a lease object in the run's storage, renewed by a heartbeat.

``{run}/checkpoints/LEASE`` is a small JSON document naming the job that writes the run (its
``owner``), the process holding it (``holder``), and a heartbeat counter renewed every ``ttl / 3``
seconds. A job starting on a run whose lease another owner holds watches the lease for up to
``ttl`` seconds: if the heartbeat moves, that job is alive and this one refuses to start
(:class:`RunLocked`); if it does not move (a crashed job), this one takes the lease over. A lease
whose recorded heartbeat is older than ``ttl`` by the wall clock is taken over at once. The lease
is deleted on a clean or preempted exit, so a relaunch does not wait.

Object stores have no compare-and-swap here, so a new holder writes the lease, waits a moment and
reads it back: of two jobs racing for a free lease, the one that wrote first sees the other's
lease and refuses. A holder that finds another holder in the lease (at a heartbeat, or in
:meth:`RunLease.check` just before a checkpoint is committed) stops writing.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from dataclasses import replace

from ctm_dist.storage import Location, StorageError
from ctm_dist.storage.checkpoints import CheckpointError, RunLocked

log = logging.getLogger(__name__)

LEASE = "LEASE"
DEFAULT_TTL = 30.0
_process_owner: tuple[int, str] | None = None


def process_owner() -> str:
    """An owner name unique to this process (the default when no job-wide owner is known)."""
    global _process_owner
    if _process_owner is None or _process_owner[0] != os.getpid():
        _process_owner = (
            os.getpid(),
            f"process:{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}",
        )
    return _process_owner[1]


def ray_job_owner() -> str | None:
    """The Ray job this process belongs to (same in the driver and in every restart of its worker
    group), or None outside Ray."""
    try:
        import ray

        if not ray.is_initialized():
            return None
        ctx = ray.get_runtime_context()
        return f"ray:{ctx.gcs_address}:{ctx.get_job_id()}"
    except Exception:  # noqa: BLE001 - no Ray, or an old one: a per-process owner then
        return None


class RunLease:
    """The writer lease of one run, kept at ``location/LEASE`` (``location``: the run's checkpoints)."""

    def __init__(self, location: Location, owner: str | None = None, ttl: float = DEFAULT_TTL):
        if ttl <= 0:
            raise ValueError(f"lease ttl must be > 0, got {ttl}")
        self.location = replace(
            location, _fs=None
        )  # its own client: the heartbeat runs in a thread
        self.owner = owner or process_owner()
        self.ttl = float(ttl)
        self.holder = uuid.uuid4().hex
        self.lost: str | None = None
        self._beat = 0
        self._acquired = time.time()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return self.location.name_url(LEASE)

    @property
    def held(self) -> bool:
        return self._thread is not None and self.lost is None

    # ------------------------------------------------------------------ store
    def read(self) -> dict | None:
        try:
            doc = json.loads(self.location.read_bytes(LEASE))
        except FileNotFoundError:
            return None
        except ValueError:  # unreadable: treat as a lease nobody renews
            return {"owner": "?", "holder": "?", "beat": -1, "heartbeat": 0.0}
        return (
            doc
            if isinstance(doc, dict)
            else {"owner": "?", "holder": "?", "beat": -1, "heartbeat": 0.0}
        )

    def _write(self) -> None:
        self._beat += 1
        doc = {
            "owner": self.owner,
            "holder": self.holder,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "beat": self._beat,
            "heartbeat": time.time(),
            "acquired": self._acquired,
            "ttl": self.ttl,
        }
        self.location.write_bytes(LEASE, json.dumps(doc).encode())

    # ------------------------------------------------------------------ taking and keeping it
    def acquire(self) -> None:
        """Take the lease (waiting up to ``ttl`` for a silent holder to expire) and start the heartbeat;
        :class:`RunLocked` if another live job holds it."""
        if self.held:
            return
        first = self.read()
        started = time.monotonic()
        current = first
        while True:
            watch = max(self.ttl, _ttl_of(current))  # the holder renews every ttl/3 of its own ttl
            if self.is_free(current) or time.monotonic() - started >= watch:
                if current is not None and current.get("owner") != self.owner:
                    log.warning(
                        "taking over the lease of %s from %s (no heartbeat for %.0f s)",
                        self.url,
                        _who(current),
                        watch,
                    )
                break
            if _moved(first, current):
                raise self._locked(current)
            time.sleep(min(self.ttl / 6, 2.0))
            current = self.read()
            if current is not None and first is None:
                first = current
        self._acquired = time.time()
        self._write()
        time.sleep(min(self.ttl / 10, 0.5))  # a job racing for the same lease writes within this
        confirm = self.read()
        if confirm is None or confirm.get("holder") != self.holder:
            raise self._locked(confirm or {})
        self.lost = None
        self._stop.clear()
        self._thread = threading.Thread(
            target=self._heartbeat, name="ctm-dist-run-lease", daemon=True
        )
        self._thread.start()

    def is_free(self, doc: dict | None) -> bool:
        """Whether this lease may take over ``doc`` (a lease as ``read`` returns it) at once: nobody
        holds it, this job does, or its holder's heartbeat is older than the holder's ttl."""
        if doc is None or doc.get("owner") == self.owner:
            return True  # nobody, or an earlier process of this same job (a restarted worker group)
        try:
            return time.time() - float(doc.get("heartbeat", 0)) > (_ttl_of(doc) or self.ttl)
        except (TypeError, ValueError):
            return False

    def _locked(self, doc: dict) -> RunLocked:
        age = time.time() - float(doc.get("heartbeat") or time.time())
        return RunLocked(
            f"{self.location.url} is being written by another job ({_who(doc)}, heartbeat "
            f"{age:.0f}s ago): two jobs with the same run name would mix their checkpoints. Stop "
            f"that job or choose another run name; a lease left by a crashed job is taken over "
            f"{self.ttl:.0f}s after its last heartbeat"
        )

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.ttl / 3):
            try:
                doc = self.read()
                if doc is not None and doc.get("holder") != self.holder:
                    self.lost = f"{_who(doc)} took the lease over"
                    log.error(
                        "lost the lease of %s: %s; no further checkpoint will be committed",
                        self.url,
                        self.lost,
                    )
                    return
                self._write()
            except (
                StorageError,
                OSError,
            ) as e:  # keep trying: the store may come back within the ttl
                log.warning("could not renew the lease %s: %s", self.url, e)

    def check(self) -> None:
        """Raise :class:`CheckpointError` unless this process still holds the lease (read from the store)."""
        if self._thread is None:
            return
        doc = self.read()
        if self.lost is None and (doc is None or doc.get("holder") != self.holder):
            self.lost = f"{_who(doc)} holds it now" if doc else "it was deleted"
        if self.lost is not None:
            raise CheckpointError(
                f"this job no longer holds the lease of {self.location.url} ({self.lost}); "
                "not committing, so that another job's checkpoints are not mixed with ours"
            )

    def release(self) -> None:
        """Stop the heartbeat and delete the lease if it is still ours."""
        thread, self._thread = self._thread, None
        if thread is None:
            return
        self._stop.set()
        thread.join(timeout=30)
        try:
            doc = self.read()
            if doc is not None and doc.get("holder") == self.holder:
                self.location.rm(LEASE)
        except (StorageError, OSError) as e:  # it expires by itself
            log.warning(
                "could not release the lease %s: %s (it expires %.0f s after its last heartbeat)",
                self.url,
                e,
                self.ttl,
            )


def live_writer(location: Location, ttl: float = DEFAULT_TTL) -> dict | None:
    """The lease at ``location`` when another job is alive and renewing it, else None.

    A lease renewed within its ttl by the wall clock is watched for one heartbeat interval (a third
    of its ttl, plus a margin); a lease that does not move belongs to a crashed job and is taken over
    by the next holder, so it is no reason to refuse. Lets a launcher refuse before any worker starts."""
    probe = RunLease(location, owner="launcher-probe", ttl=ttl)
    first = probe.read()
    if first is None or probe.is_free(first):
        return None
    deadline = time.monotonic() + (_ttl_of(first) or ttl) / 3 * 1.5
    while time.monotonic() < deadline:
        time.sleep(0.5)
        now = probe.read()
        if now is None:
            return None
        if _moved(first, now):
            return now
    return None


def _ttl_of(doc: dict | None) -> float:
    try:
        return float((doc or {}).get("ttl") or 0.0)
    except (TypeError, ValueError):
        return 0.0


def _moved(first: dict | None, now: dict | None) -> bool:
    """The lease changed while watched: its holder is alive (or another job took it)."""
    if first is None or now is None:
        return False
    return (now.get("holder"), now.get("beat")) != (first.get("holder"), first.get("beat"))


def _who(doc: dict | None) -> str:
    doc = doc or {}
    return f"owner {doc.get('owner', '?')}, host {doc.get('host', '?')}, pid {doc.get('pid', '?')}"
