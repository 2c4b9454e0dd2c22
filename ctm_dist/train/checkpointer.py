"""Checkpoints on object storage that are either complete and loadable or invisible.

The format (layout, ``COMMIT`` marker, checks, safe loading, errors) is defined in
:mod:`ctm_dist.storage.checkpoints`; this module saves and loads it with DeepSpeed engines. Rank 0
writes ``COMMIT`` LAST, once every rank has uploaded; it names exactly the files the ranks of this
save wrote, each with its size and SHA-256. A directory without ``COMMIT``, or whose listed files
are missing or have other sizes, is ignored by ``committed_steps()`` / ``latest_committed()`` and
deleted by a later save once a newer step is committed. DeepSpeed's ``latest`` file is never
written or read: tags are passed explicitly.

One writer per run: the first ``save`` (or :meth:`Checkpointer.acquire`, which the trainer calls
before resuming) takes the run's lease (:mod:`ctm_dist.train.lease`); a second job on the same run
fails with :class:`RunLocked`, and a job that lost the lease commits nothing.

Loading refuses clearly: no checkpoint (:class:`NoCheckpoint`), another model config
(:class:`ConfigMismatch`), something that is not a checkpoint or a file whose SHA-256 differs from
COMMIT's (:class:`NotACheckpoint`), a pickle that needs code to load or a file name that is a path
(:class:`UnsafeCheckpoint`). Every downloaded file is opened with ``torch.load(weights_only=True)``
before DeepSpeed, whose own loader does not use it, sees it. Without an explicit ``step`` the
newest committed step is loaded; if its files fail those checks the previous committed step is
tried (with a warning), and pruning never deletes the newest step this checkpointer verified.

Elastic resume (another world size or ZeRO stage): ZeRO 1/2/3 checkpoints are converted
on each rank with DeepSpeed's ``ds_to_universal`` and loaded as a universal checkpoint
(fp32 weights AND Adam moments re-partitioned for the new world size); stage-0 checkpoints
hold the whole optimizer state and load directly. ``load(..., all_ranks=True)`` returns
every saved rank's extra state so the caller can merge data positions.

Storage calls retry transient errors with backoff until ``retry_deadline`` seconds have
passed; then the save raises :class:`CheckpointError` and the previous commit stays the
newest valid one.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import io
import json
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from ctm_dist.storage import Location, StorageError
from ctm_dist.storage import checkpoints as fmt
from ctm_dist.storage.checkpoints import (
    COMMIT,
    FORMAT,
    READABLE_FORMATS,
    CheckpointError,
    ConfigMismatch,
    NoCheckpoint,
    NotACheckpoint,
    RunLocked,
    UnsafeCheckpoint,
    extra_name,
    safe_load,
    step_name,
)
from ctm_dist.train.lease import DEFAULT_TTL, RunLease

__all__ = [
    "COMMIT",
    "FORMAT",
    "Checkpointer",
    "CheckpointError",
    "ConfigMismatch",
    "NoCheckpoint",
    "NotACheckpoint",
    "RunLocked",
    "UnsafeCheckpoint",
    "extra_name",
    "redact",
    "safe_load",
    "step_name",
]

log = logging.getLogger(__name__)

_SECRET_KEY = re.compile(
    r"secret|password|passwd|token|credential|access_key|private_key|api_key", re.IGNORECASE
)
# Failures of a step's files that make it unusable but leave the engine untouched: fall back.
_UNUSABLE = (NotACheckpoint, UnsafeCheckpoint)
_ERRORS = {
    cls.__name__: cls
    for cls in (
        CheckpointError,
        NoCheckpoint,
        ConfigMismatch,
        NotACheckpoint,
        UnsafeCheckpoint,
        RunLocked,
    )
}


def redact(config: Any, secrets: tuple[str, ...] = ()) -> Any:
    """A JSON-friendly copy of ``config``: values under secret-looking keys, and any occurrence
    of ``secrets``, replaced by ``***``."""
    if isinstance(config, dict):
        return {
            str(k): (
                "***" if _SECRET_KEY.search(str(k)) and v not in (None, "") else redact(v, secrets)
            )
            for k, v in config.items()
        }
    if isinstance(config, (list, tuple)):
        return [redact(v, secrets) for v in config]
    if isinstance(config, (int, float, bool)) or config is None:
        return config
    text = str(config)
    for secret in secrets:
        if secret:
            text = text.replace(secret, "***")
    return text


class Checkpointer:
    """Save and load one rank's part of a DeepSpeed checkpoint under ``{run}/checkpoints/``.

    Every rank constructs one with its ``rank`` and ``world_size`` and calls ``acquire`` / ``save`` /
    ``load`` collectively. ``barrier`` syncs the ranks; by default ``torch.distributed``
    (when initialised) is used, which also lets every rank see the others' failures and lets
    rank 0 learn which files each rank wrote. ``owner`` names the job for the run's lease (a
    restarted worker group of the same job takes it over at once; default: this process);
    ``lease_ttl`` is how long a silent holder keeps it.
    """

    def __init__(
        self,
        run_location,
        keep_last: int = 3,
        rank: int = 0,
        world_size: int = 1,
        local_dir: str | os.PathLike | None = None,
        barrier: Callable[[], None] | None = None,
        retry_deadline: float | None = None,
        owner: str | None = None,
        lease_ttl: float = DEFAULT_TTL,
    ):
        if keep_last < 1:
            raise ValueError(f"keep_last must be >= 1, got {keep_last}")
        run_location = Location.parse(run_location)
        if retry_deadline is not None:
            run_location = replace(run_location, retry_deadline=float(retry_deadline), _fs=None)
        self.run_location = run_location
        self.location = run_location.child("checkpoints")
        self.keep_last, self.rank, self.world_size = keep_last, rank, world_size
        self._own_local_dir = not local_dir
        self.local_dir = (
            Path(local_dir)
            if local_dir
            else Path(tempfile.gettempdir()) / f"ctm-dist-ckpt-{os.getpid()}"
        )
        self._barrier = barrier
        self.loaded_step: int | None = None
        self.verified: set[int] = (
            set()
        )  # steps this checkpointer committed or loaded after checking every file
        self.lease = RunLease(self.location, owner=owner, ttl=lease_ttl) if rank == 0 else None
        self._lease_taken = False

    def __repr__(self) -> str:
        return (
            f"Checkpointer({self.location.url!r}, rank={self.rank}, world_size={self.world_size})"
        )

    # ------------------------------------------------------------------ the run's lease
    def acquire(self) -> None:
        """Take the run's writer lease (rank 0; collective). :class:`RunLocked` on every rank if
        another live job writes this run."""
        error = None
        if self.lease is not None:
            try:
                self.lease.acquire()
            except Exception as e:
                error = e
        self._sync_or_raise(error, f"taking the lease of {self.location.url}", keep=(RunLocked,))
        self._lease_taken = True

    def close(self) -> None:
        """Release the lease (at the end of training and on a preempted exit)."""
        if self.lease is not None:
            self.lease.release()
        self._lease_taken = False

    # ------------------------------------------------------------------ what is committed
    def read_commit(self, step: int) -> dict:
        """The COMMIT marker of ``step`` after checking its file names and that they exist with the listed sizes."""
        return fmt.read_commit(self.location, int(step))

    def committed_steps(self) -> list[int]:
        """Steps whose COMMIT marker exists and whose files are all present; ascending."""
        return fmt.committed_steps(
            self.location, on_invalid=lambda step, e: log.warning("ignoring checkpoint: %s", e)
        )

    def latest_committed(self) -> int | None:
        steps = self.committed_steps()
        return steps[-1] if steps else None

    # ------------------------------------------------------------------ save
    def save(self, step: int, engine, extra_state: dict, config: dict | None = None) -> dict:
        """Save this rank's shards and ``extra_state``; rank 0 commits once all ranks uploaded.

        Collective: every rank calls it with the same ``step``. Returns the commit marker.
        """
        step = int(step)
        name = step_name(step)
        if not self._lease_taken:
            self.acquire()
        error, state = None, "absent"
        try:
            if self._has_valid_commit(step):
                state = "ours" if step in self.verified else "foreign"
        except Exception as e:
            error = e
        states = self._sync_or_raise(error, f"checking checkpoint {name}", state)
        if "ours" in states:
            log.info("checkpoint %s is already committed; not saving it again", name)
            return self.read_commit(step)
        work = self.local_dir / f"save-{name}-rank{self.rank}"
        shutil.rmtree(work, ignore_errors=True)
        try:
            # 1. DeepSpeed's own shards (collective), then our extra state, locally.
            engine.save_checkpoint(
                os.fspath(work), tag=name, client_state={"ctm_dist_step": step}, save_latest=False
            )
            error = None
            try:
                extra_path = work / name / extra_name(self.rank)
                torch.save(
                    {
                        "format": FORMAT,
                        "step": step,
                        "rank": self.rank,
                        "world_size": self.world_size,
                        "state": extra_state,
                    },
                    extra_path,
                )
                safe_load(
                    extra_path, "extra_state"
                )  # fail now, not at resume, if it is not plain data
                if self.rank == 0 and self.location.exists(name):
                    if (
                        "foreign" in states
                    ):  # e.g. a newer step that failed its checks and was skipped at resume
                        log.warning(
                            "replacing %s, committed but neither written nor loaded by this run",
                            self.location.name_url(name),
                        )
                        with contextlib.suppress(FileNotFoundError):
                            self.location.rm(f"{name}/{COMMIT}")  # invisible first, then gone
                    self._remove_dir(name)  # debris of an earlier attempt at this step
            except Exception as e:
                error = e
            self._sync_or_raise(error, f"preparing checkpoint {name}")
            # 2. Upload this rank's files, with their sizes and checksums.
            error, files = None, {}
            try:
                for path in sorted((work / name).iterdir()):
                    files[path.name] = [path.stat().st_size, fmt.sha256_file(path)]
                    self.location.put_file(path, f"{name}/{path.name}")
            except Exception as e:
                error = e
            all_files = self._sync_or_raise(error, f"uploading checkpoint {name}", files)
            # 3. Rank 0 writes COMMIT, last, naming exactly the files the ranks of this save wrote.
            error, commit = None, None
            if self.rank == 0:
                try:
                    commit = self._commit(step, engine, all_files, config)
                except Exception as e:
                    error = e
            commits = self._sync_or_raise(error, f"committing checkpoint {name}", commit)
            commit = commit or next((c for c in commits if c), None)
        finally:
            self._clean(work)
        self.verified.add(step)
        if self.rank == 0:
            try:
                self.prune()
            except (
                StorageError,
                CheckpointError,
            ) as e:  # the commit stands; pruning retries next time
                log.warning("could not prune old checkpoints: %s", e)
        return commit if commit is not None else self.read_commit(step)

    def _commit(self, step: int, engine, all_files: list[dict], config: dict | None) -> dict:
        name = step_name(step)
        merged: dict[str, list] = {}
        for rank_files in all_files:
            for fname, entry in rank_files.items():
                if fname in merged and merged[fname] != entry:
                    raise CheckpointError(f"two ranks wrote different {fname}")
                merged[fname] = entry
        missing = [extra_name(r) for r in range(self.world_size) if extra_name(r) not in merged]
        if missing:  # with a custom barrier rank 0 learns only its own files
            raise CheckpointError(
                f"the files of ranks' extra states are unknown to rank 0: {missing[:5]} "
                "(saving with several ranks needs torch.distributed)"
            )
        present = fmt.stored_sizes(self.location, name)
        bad = [f for f, (size, _) in merged.items() if present.get(f) != size]
        if bad:
            raise CheckpointError(f"uploaded files are missing or short in the store: {bad[:5]}")
        others = sorted(set(present) - set(merged))
        if others:
            log.warning(
                "%s holds files this save did not write; they are not part of the checkpoint: %s",
                self.location.name_url(name),
                others[:5],
            )
        commit = {
            "format": FORMAT,
            "step": step,
            "world_size": self.world_size,
            "zero_stage": int(engine.zero_optimization_stage()),
            "files": {f: size for f, (size, _) in sorted(merged.items())},
            "sha256": {f: digest for f, (_, digest) in sorted(merged.items())},
            "config": redact(config or {}, self._secrets()),
            "time": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        }
        if self.lease is not None:
            self.lease.check()
        self.location.write_bytes(f"{name}/{COMMIT}", json.dumps(commit, indent=1).encode())
        return commit

    def prune(self) -> list[str]:
        """Keep the newest ``keep_last`` commits and the newest one this checkpointer verified; delete
        older ones and uncommitted debris older than the newest commit. Returns the deleted directory names."""
        committed = self.committed_steps()
        if not committed:
            return []
        keep = set(committed[-self.keep_last :])
        good = sorted(self.verified & set(committed))
        if good:
            keep.add(good[-1])
        newest = committed[-1]
        deleted = []
        for step in fmt.step_dirs(self.location):
            name = step_name(step)
            if step in keep or (step > newest and step not in committed):
                continue
            if step in committed:
                self.location.rm(f"{name}/{COMMIT}")  # invisible first, then gone
            self._remove_dir(name)
            deleted.append(name)
        return deleted

    # ------------------------------------------------------------------ load
    def load(
        self,
        engine,
        step: int | None = None,
        config: dict | None = None,
        all_ranks: bool = False,
        load_optimizer_states: bool = True,
    ) -> dict | list[dict]:
        """Load ``step`` (default: the newest committed step whose files pass the checks, falling back
        to older ones with a warning) into ``engine``; return this rank's extra state, or with
        ``all_ranks=True`` the list of every saved rank's extra state.

        ``config``, when given, must have the same ``model`` section as the one saved.
        After a world-size change only ``all_ranks=True`` is accepted (positions must be merged).
        """
        if step is not None:
            return self._load_step(engine, int(step), config, all_ranks, load_optimizer_states)
        steps = self.committed_steps()
        if not steps:
            raise NoCheckpoint(f"no committed checkpoint under {self.location.url}")
        for i, candidate in enumerate(reversed(steps)):
            try:
                return self._load_step(engine, candidate, config, all_ranks, load_optimizer_states)
            except _UNUSABLE as e:
                older = steps[-i - 2] if i + 1 < len(steps) else None
                if older is None:
                    raise
                log.warning(
                    "cannot load %s (%s); falling back to the previous committed step %s",
                    step_name(candidate),
                    e,
                    step_name(older),
                )
        raise AssertionError("unreachable")

    def _load_step(
        self, engine, step: int, config: dict | None, all_ranks: bool, load_optimizer_states: bool
    ) -> dict | list[dict]:
        name = step_name(step)
        commit = self.read_commit(step)
        if config is not None:
            self._check_model_config(commit, config, name)
        saved_ws, saved_stage = int(commit["world_size"]), int(commit["zero_stage"])
        stage = int(engine.zero_optimization_stage())
        resized = saved_ws != self.world_size or saved_stage != stage
        if resized and not all_ranks:
            raise CheckpointError(
                f"{name} was saved by {saved_ws} ranks (ZeRO stage {saved_stage}) and this run "
                f"has {self.world_size} (stage {stage}): load it with all_ranks=True and "
                "merge the data positions"
            )
        if resized and saved_stage == 0 and stage != 0:
            raise CheckpointError(
                f"{name} was saved without ZeRO (stage 0); loading it under ZeRO stage "
                f"{stage} is not supported"
            )
        universal = resized and saved_stage > 0

        work = self.local_dir / f"load-{name}-rank{self.rank}"
        shutil.rmtree(work, ignore_errors=True)
        ds_dir, extra_dir = work / "ds" / name, work / "extra"
        # ZeRO's "elastic_checkpoint" option makes every rank read every rank's optimizer shard.
        all_shards = universal or bool(getattr(engine, "zero_elastic_checkpoint", lambda: False)())
        try:
            error, states = None, []
            try:
                wanted_extra = range(saved_ws) if all_ranks else [self.rank]
                extras = sorted(extra_name(r) for r in wanted_extra)
                shards = []
                for fname in commit["files"]:
                    if fname.startswith("extra-rank-"):
                        continue
                    m = fmt.RANK_FILE.search(fname)
                    if m and not all_shards and int(m.group(1)) != self.rank:
                        continue  # another rank's shard
                    shards.append(fname)
                fmt.fetch_files(self.location, commit, extras, extra_dir)
                fmt.fetch_files(self.location, commit, shards, ds_dir)
                for path in sorted(
                    ds_dir.iterdir()
                ):  # before DeepSpeed's own (unsafe) loader sees them
                    safe_load(path, self.location.name_url(f"{name}/{path.name}"))
                for e in extras:
                    data = safe_load(extra_dir / e, self.location.name_url(f"{name}/{e}"))
                    if (
                        not isinstance(data, dict)
                        or data.get("format") not in READABLE_FORMATS
                        or "state" not in data
                    ):
                        raise NotACheckpoint(
                            f"{self.location.name_url(name + '/' + e)}: not a ctm-dist extra state"
                        )
                    states.append(data["state"])
            except Exception as e:
                error = e
            # every rank loads the same step or none does (a fallback must happen everywhere)
            self._sync_or_raise(
                error,
                f"reading checkpoint {name}",
                keep=_UNUSABLE + (StorageError,),
                after="the engine was not changed",
            )
            tag = name
            if universal:
                tag = self._to_universal(ds_dir)
            self._engine_load(engine, ds_dir.parent, tag, universal, load_optimizer_states)
        finally:
            self._clean(work)
        self.loaded_step = step
        self.verified.add(step)
        return states if all_ranks else states[0]

    def load_latest(self, engine, config: dict | None = None, all_ranks: bool = False):
        """``(step, extra_state)`` of the newest loadable commit loaded into ``engine``, or None if there is none."""
        if self.latest_committed() is None:
            return None
        state = self.load(engine, config=config, all_ranks=all_ranks)
        return self.loaded_step, state

    # ------------------------------------------------------------------ internals
    def _engine_load(
        self, engine, load_dir: Path, tag: str, universal: bool, load_optimizer_states: bool
    ):
        cfg = engine._config
        previous = cfg.load_universal_checkpoint
        cfg.load_universal_checkpoint = universal  # read by load_checkpoint at call time
        try:
            path, _client = engine.load_checkpoint(
                os.fspath(load_dir),
                tag=tag,
                load_module_strict=True,
                load_optimizer_states=load_optimizer_states,
                load_lr_scheduler_states=load_optimizer_states,
            )
        except (RuntimeError, KeyError, AssertionError) as e:
            raise CheckpointError(
                f"DeepSpeed could not load {tag}: {type(e).__name__}: "
                f"{' '.join(str(e).split())[:400]}"
            ) from e
        finally:
            cfg.load_universal_checkpoint = previous
        if path is None:
            raise NotACheckpoint(
                f"DeepSpeed found no checkpoint for tag {tag} in the downloaded files"
            )

    def _to_universal(self, ds_dir: Path) -> str:
        """Convert the downloaded ZeRO checkpoint with DeepSpeed's ds_to_universal; return the new tag."""
        from deepspeed.checkpoint import ds_to_universal

        tag = ds_dir.name + "-universal"
        args = argparse.Namespace(
            input_folder=os.fspath(ds_dir),
            output_folder=os.fspath(ds_dir.parent / tag),
            num_extract_workers=1,
            num_merge_workers=1,
            keep_temp_folder=False,
            strict=True,
            inject_missing_state=True,
        )
        with contextlib.redirect_stdout(io.StringIO()):
            ds_to_universal.main(args)
        return tag

    def _check_model_config(self, commit: dict, config: dict, name: str) -> None:
        saved = (commit.get("config") or {}).get("model")
        current = redact(config, self._secrets()).get("model") if isinstance(config, dict) else None
        if saved is None or current is None:
            return
        if saved != current:
            keys = (
                sorted(set(saved) | set(current))
                if isinstance(saved, dict) and isinstance(current, dict)
                else []
            )
            diff = [
                f"{k}: {saved.get(k)!r} (checkpoint) != {current.get(k)!r} (now)"
                for k in keys
                if saved.get(k) != current.get(k)
            ]
            raise ConfigMismatch(
                f"{self.location.name_url(name)} was saved for another model config: "
                + ("; ".join(diff[:8]) or f"{saved!r} != {current!r}")
            )

    def _clean(self, work: Path) -> None:
        shutil.rmtree(work, ignore_errors=True)
        if self._own_local_dir:
            with contextlib.suppress(OSError):  # still in use by another call: leave it
                self.local_dir.rmdir()

    def _secrets(self) -> tuple[str, ...]:
        loc = self.run_location
        return tuple(
            s
            for s in (
                loc.secret,
                loc.key,
                os.environ.get("AWS_SECRET_ACCESS_KEY"),
                os.environ.get("AWS_SESSION_TOKEN"),
            )
            if s
        )

    def _remove_dir(self, name: str) -> None:
        loc = self.location
        with contextlib.suppress(FileNotFoundError):
            loc.rm(name, recursive=True)
        if loc.protocol == "s3":  # SeaweedFS keeps a "dir/" marker object that rm leaves behind
            bucket, _, key = loc.join(name).partition("/")
            with contextlib.suppress(FileNotFoundError):
                loc.call(
                    lambda: loc.fs.call_s3("delete_object", Bucket=bucket, Key=key + "/"), name
                )

    def _has_valid_commit(self, step: int) -> bool:
        try:
            self.read_commit(step)
            return True
        except (NoCheckpoint, NotACheckpoint, UnsafeCheckpoint):
            return False  # a broken marker is debris: this save replaces it

    def _sizes(self, name: str) -> dict[str, int]:
        return fmt.stored_sizes(self.location, name)

    def _sync_or_raise(
        self,
        error: BaseException | None,
        what: str,
        payload: Any = None,
        keep: tuple[type[BaseException], ...] = (),
        after: str = "nothing was committed and the previous committed checkpoint stays valid",
    ) -> list:
        """Barrier that also tells every rank whether any rank failed; returns all ranks' payloads.

        A failure is re-raised as a :class:`CheckpointError` saying nothing was committed, except
        errors of the ``keep`` types, which every rank raises as they are (the same type everywhere)."""
        message = None if error is None else f"rank {self.rank}: {type(error).__name__}: {error}"
        kind = type(error).__name__ if error is not None else None
        import torch.distributed as dist

        if (
            self._barrier is None
            and dist.is_available()
            and dist.is_initialized()
            and dist.get_world_size() > 1
        ):
            gathered: list = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, (message, kind, payload))
            failures = [(m, k) for m, k, _ in gathered if m]
            payloads = [p for _, _, p in gathered]
        else:
            if self._barrier is not None:
                self._barrier()
            elif self.world_size > 1:
                raise CheckpointError(
                    f"{self.world_size} ranks but no barrier: initialise torch.distributed "
                    "or pass barrier="
                )
            failures, payloads = ([(message, kind)] if message else []), [payload]
        if not failures:
            return payloads
        if error is not None and isinstance(error, keep):
            raise error
        kept = [(m, _ERRORS.get(k)) for m, k in failures]
        if keep and all(cls is not None and issubclass(cls, keep) for _, cls in kept):
            raise kept[0][1]("; ".join(m for m, _ in kept)[:600])
        raise CheckpointError(
            f"{what} failed ({'; '.join(m for m, _ in failures)[:600]}); {after}"
        ) from error
