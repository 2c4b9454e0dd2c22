"""Checkpoints on object storage that are either complete and loadable or invisible.

Layout: ``{run}/checkpoints/step-{step:09d}/`` holds DeepSpeed's own files for tag
``step-{step:09d}`` (``mp_rank_*_model_states.pt``, ``*_optim_states.pt``), one
``extra-rank-{rank:05d}.pt`` per rank (data position, RNG states: plain tensors and dicts)
and, written LAST by rank 0 once every rank has uploaded, the ``COMMIT`` marker::

    {"format": "ctm-dist-checkpoint/1", "step": 100, "world_size": 2, "zero_stage": 2,
     "files": {"mp_rank_00_model_states.pt": 3417, ...}, "config": {...}, "time": "..."}

A directory without ``COMMIT``, or whose listed files are missing or have other sizes,
is ignored by ``committed_steps()`` / ``latest_committed()`` and deleted by a later save
once a newer step is committed. DeepSpeed's ``latest`` file is never written or read:
tags are passed explicitly.

Loading refuses clearly: no checkpoint (:class:`NoCheckpoint`), another model config
(:class:`ConfigMismatch`), something that is not a checkpoint (:class:`NotACheckpoint`), a
pickle that needs code to load (:class:`UnsafeCheckpoint`; every downloaded file is opened
with ``torch.load(weights_only=True)`` before DeepSpeed, whose own loader does not use it,
sees it).

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
import pickle
import posixpath
import re
import shutil
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable

import torch

log = logging.getLogger(__name__)

FORMAT = "ctm-dist-checkpoint/1"
COMMIT = "COMMIT"
_STEP_DIR = re.compile(r"step-(\d{9})")
_RANK_FILE = re.compile(r"(?:^|_)(?:zero_pp_rank|bf16_zero_pp_rank|fp16_zero_pp_rank)_(\d+)_")
_SECRET_KEY = re.compile(r"secret|password|passwd|token|credential|access_key|private_key|api_key",
                         re.IGNORECASE)


class CheckpointError(RuntimeError):
    """A checkpoint could not be saved or loaded; the message says which and why."""


class NoCheckpoint(CheckpointError):
    """No committed checkpoint exists where one was asked for."""


class ConfigMismatch(CheckpointError):
    """The checkpoint was written for another model configuration."""


class NotACheckpoint(CheckpointError):
    """A file in the checkpoint is not what a checkpoint holds (corrupt, foreign, truncated)."""


class UnsafeCheckpoint(CheckpointError):
    """A file would need to run code to unpickle; it was refused, nothing was executed."""


def step_name(step: int) -> str:
    return f"step-{int(step):09d}"


def extra_name(rank: int) -> str:
    return f"extra-rank-{int(rank):05d}.pt"


def redact(config: Any, secrets: tuple[str, ...] = ()) -> Any:
    """A JSON-friendly copy of ``config``: values under secret-looking keys, and any occurrence
    of ``secrets``, replaced by ``***``."""
    if isinstance(config, dict):
        return {str(k): ("***" if _SECRET_KEY.search(str(k)) and v not in (None, "") else redact(v, secrets))
                for k, v in config.items()}
    if isinstance(config, (list, tuple)):
        return [redact(v, secrets) for v in config]
    if isinstance(config, (int, float, bool)) or config is None:
        return config
    text = str(config)
    for secret in secrets:
        if secret:
            text = text.replace(secret, "***")
    return text


def _deepspeed_safe_globals() -> list:
    """DeepSpeed classes its optimizer-state files pickle; plain data, allowed for weights_only."""
    found = []
    for module, names in (("deepspeed.runtime.fp16.loss_scaler", ("LossScaler", "DynamicLossScaler")),
                          ("deepspeed.runtime.zero.config", ("ZeroStageEnum",)),
                          ("deepspeed.utils.tensor_fragment", ("fragment_address",))):
        try:
            mod = __import__(module, fromlist=list(names))
        except ImportError:
            continue
        found += [getattr(mod, n) for n in names if hasattr(mod, n)]
    return found


def safe_load(path: str | os.PathLike, what: str | None = None) -> Any:
    """``torch.load(weights_only=True)`` with clear errors for foreign files and code-carrying pickles."""
    what = what or os.fspath(path)
    try:
        with torch.serialization.safe_globals(_deepspeed_safe_globals()):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - every way a foreign or hostile file can fail
        lines = str(e).strip().splitlines()
        unsafe = [ln for ln in lines if "GLOBAL" in ln or "Unsupported global" in ln]
        if isinstance(e, pickle.UnpicklingError) and unsafe:
            raise UnsafeCheckpoint(f"{what}: refused to unpickle (it needs code to load, which could run "
                                   f"arbitrary commands; nothing was executed): {unsafe[0].strip()[:300]}") from None
        msg = " ".join(str(e).split())[:200]
        raise NotACheckpoint(f"{what}: not a torch checkpoint file ({type(e).__name__}: {msg})") from None


class Checkpointer:
    """Save and load one rank's part of a DeepSpeed checkpoint under ``{run}/checkpoints/``.

    Every rank constructs one with its ``rank`` and ``world_size`` and calls ``save`` /
    ``load`` collectively. ``barrier`` syncs the ranks; by default ``torch.distributed``
    (when initialised) is used, which also lets every rank see the others' failures.
    """

    def __init__(self, run_location, keep_last: int = 3, rank: int = 0, world_size: int = 1,
                 local_dir: str | os.PathLike | None = None, barrier: Callable[[], None] | None = None,
                 retry_deadline: float | None = None):
        if keep_last < 1:
            raise ValueError(f"keep_last must be >= 1, got {keep_last}")
        from ctm_dist.storage import Location

        run_location = Location.parse(run_location)
        if retry_deadline is not None:
            run_location = replace(run_location, retry_deadline=float(retry_deadline), _fs=None)
        self.run_location = run_location
        self.location = run_location.child("checkpoints")
        self.keep_last, self.rank, self.world_size = keep_last, rank, world_size
        self._own_local_dir = not local_dir
        self.local_dir = Path(local_dir) if local_dir else Path(tempfile.gettempdir()) / f"ctm-dist-ckpt-{os.getpid()}"
        self._barrier = barrier
        self.loaded_step: int | None = None

    def __repr__(self) -> str:
        return f"Checkpointer({self.location.url!r}, rank={self.rank}, world_size={self.world_size})"

    # ------------------------------------------------------------------ what is committed
    def read_commit(self, step: int) -> dict:
        """The COMMIT marker of ``step`` after checking its files exist with the listed sizes."""
        name = step_name(step)
        try:
            raw = self.location.read_bytes(f"{name}/{COMMIT}")
        except FileNotFoundError:
            raise NoCheckpoint(f"{self.location.name_url(name)} is not committed (no {COMMIT} marker)") from None
        try:
            commit = json.loads(raw)
            if commit.get("format") != FORMAT or int(commit["step"]) != step:
                raise ValueError("wrong format or step")
            files = {str(k): int(v) for k, v in commit["files"].items()}
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise NotACheckpoint(f"{self.location.name_url(name + '/' + COMMIT)}: not a ctm-dist "
                                 f"commit marker ({e})") from None
        present = self._sizes(name)
        for fname, size in files.items():
            if present.get(fname) != size:
                raise NotACheckpoint(f"{self.location.name_url(name + '/' + fname)}: listed in {COMMIT} "
                                     f"with {size} bytes but the store has {present.get(fname, 'no file')}")
        commit["files"] = files
        return commit

    def committed_steps(self) -> list[int]:
        """Steps whose COMMIT marker exists and whose files are all present; ascending."""
        steps = []
        for step in self._step_dirs():
            try:
                self.read_commit(step)
                steps.append(step)
            except (NoCheckpoint, NotACheckpoint) as e:
                if not isinstance(e, NoCheckpoint):
                    log.warning("ignoring checkpoint: %s", e)
        return steps

    def latest_committed(self) -> int | None:
        steps = self.committed_steps()
        return steps[-1] if steps else None

    # ------------------------------------------------------------------ save
    def save(self, step: int, engine, extra_state: dict, config: dict | None = None) -> dict:
        """Save this rank's shards and ``extra_state``; rank 0 commits once all ranks uploaded.

        Collective: every rank calls it with the same ``step``. Returns the commit marker.
        """
        from ctm_dist.storage import StorageError

        step = int(step)
        name = step_name(step)
        error, already = None, False
        try:
            already = self._has_valid_commit(step)
        except Exception as e:
            error = e
        if any(self._sync_or_raise(error, f"checking checkpoint {name}", already)):
            log.info("checkpoint %s is already committed; not saving it again", name)
            return self.read_commit(step)
        work = self.local_dir / f"save-{name}-rank{self.rank}"
        shutil.rmtree(work, ignore_errors=True)
        try:
            # 1. DeepSpeed's own shards (collective), then our extra state, locally.
            engine.save_checkpoint(os.fspath(work), tag=name, client_state={"ctm_dist_step": step},
                                   save_latest=False)
            error = None
            try:
                extra_path = work / name / extra_name(self.rank)
                torch.save({"format": FORMAT, "step": step, "rank": self.rank, "world_size": self.world_size,
                            "state": extra_state}, extra_path)
                safe_load(extra_path, "extra_state")  # fail now, not at resume, if it is not plain data
                if self.rank == 0 and self.location.exists(name):
                    self._remove_dir(name)  # debris of an earlier attempt at this step
            except Exception as e:
                error = e
            self._sync_or_raise(error, f"preparing checkpoint {name}")
            # 2. Upload this rank's files.
            error, files = None, {}
            try:
                for path in sorted((work / name).iterdir()):
                    self.location.put_file(path, f"{name}/{path.name}")
                    files[path.name] = path.stat().st_size
            except Exception as e:
                error = e
            all_files = self._sync_or_raise(error, f"uploading checkpoint {name}", files)
            # 3. Rank 0 writes COMMIT, last.
            error, commit = None, None
            if self.rank == 0:
                try:
                    present = self._sizes(name)
                    for rank_files in all_files:  # with a custom barrier only rank 0's own are here
                        bad = [f for f, size in rank_files.items() if present.get(f) != size]
                        if bad:
                            raise CheckpointError(f"uploaded files are missing or short in the store: {bad[:5]}")
                    missing = [extra_name(r) for r in range(self.world_size) if extra_name(r) not in present]
                    if missing:
                        raise CheckpointError(f"ranks' extra states are missing in the store: {missing[:5]}")
                    merged = {f: size for f, size in present.items() if f != COMMIT and ".tmp-" not in f}
                    commit = {"format": FORMAT, "step": step, "world_size": self.world_size,
                              "zero_stage": int(engine.zero_optimization_stage()),
                              "files": dict(sorted(merged.items())), "config": redact(config or {}, self._secrets()),
                              "time": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}
                    self.location.write_bytes(f"{name}/{COMMIT}", json.dumps(commit, indent=1).encode())
                except Exception as e:
                    error = e
            commits = self._sync_or_raise(error, f"committing checkpoint {name}", commit)
            commit = commit or next((c for c in commits if c), None)
        finally:
            self._clean(work)
        if self.rank == 0:
            try:
                self.prune()
            except (StorageError, CheckpointError) as e:  # the commit stands; pruning retries next time
                log.warning("could not prune old checkpoints: %s", e)
        return commit if commit is not None else self.read_commit(step)

    def prune(self) -> list[str]:
        """Keep the newest ``keep_last`` commits; delete older ones and uncommitted debris older
        than the newest commit. Returns the deleted directory names."""
        committed = self.committed_steps()
        if not committed:
            return []
        keep = set(committed[-self.keep_last:])
        newest = committed[-1]
        deleted = []
        for step in self._step_dirs():
            name = step_name(step)
            if step in keep or (step > newest and step not in committed):
                continue
            if step in committed:
                self.location.rm(f"{name}/{COMMIT}")  # invisible first, then gone
            self._remove_dir(name)
            deleted.append(name)
        return deleted

    # ------------------------------------------------------------------ load
    def load(self, engine, step: int | None = None, config: dict | None = None,
             all_ranks: bool = False, load_optimizer_states: bool = True) -> dict | list[dict]:
        """Load ``step`` (default: the newest committed) into ``engine``; return this rank's extra
        state, or with ``all_ranks=True`` the list of every saved rank's extra state.

        ``config``, when given, must have the same ``model`` section as the one saved.
        After a world-size change only ``all_ranks=True`` is accepted (positions must be merged).
        """
        if step is None:
            step = self.latest_committed()
            if step is None:
                raise NoCheckpoint(f"no committed checkpoint under {self.location.url}")
        name = step_name(step)
        commit = self.read_commit(step)
        if config is not None:
            self._check_model_config(commit, config, name)
        saved_ws, saved_stage = int(commit["world_size"]), int(commit["zero_stage"])
        stage = int(engine.zero_optimization_stage())
        resized = saved_ws != self.world_size or saved_stage != stage
        if resized and not all_ranks:
            raise CheckpointError(f"{name} was saved by {saved_ws} ranks (ZeRO stage {saved_stage}) and this run "
                                  f"has {self.world_size} (stage {stage}): load it with all_ranks=True and "
                                  "merge the data positions")
        if resized and saved_stage == 0 and stage != 0:
            raise CheckpointError(f"{name} was saved without ZeRO (stage 0); loading it under ZeRO stage "
                                  f"{stage} is not supported")
        universal = resized and saved_stage > 0

        work = self.local_dir / f"load-{name}-rank{self.rank}"
        shutil.rmtree(work, ignore_errors=True)
        ds_dir, extra_dir = work / "ds" / name, work / "extra"
        ds_dir.mkdir(parents=True)
        extra_dir.mkdir()
        # ZeRO's "elastic_checkpoint" option makes every rank read every rank's optimizer shard.
        all_shards = universal or bool(getattr(engine, "zero_elastic_checkpoint", lambda: False)())
        try:
            wanted_extra = range(saved_ws) if all_ranks else [self.rank]
            extras = {extra_name(r) for r in wanted_extra}
            for fname in commit["files"]:
                if fname.startswith("extra-rank-"):
                    if fname in extras:
                        self.location.get_file(f"{name}/{fname}", extra_dir / fname)
                    continue
                m = _RANK_FILE.search(fname)
                if m and not all_shards and int(m.group(1)) != self.rank:
                    continue  # another rank's shard
                self.location.get_file(f"{name}/{fname}", ds_dir / fname)
            missing = [e for e in extras if not (extra_dir / e).exists()]
            if missing:
                raise NotACheckpoint(f"{self.location.name_url(name)}: {missing[0]} is not in the checkpoint")
            for path in sorted(ds_dir.iterdir()):  # before DeepSpeed's own (unsafe) loader sees them
                safe_load(path, self.location.name_url(f"{name}/{path.name}"))
            states = []
            for e in sorted(extras):
                data = safe_load(extra_dir / e, self.location.name_url(f"{name}/{e}"))
                if not isinstance(data, dict) or data.get("format") != FORMAT or "state" not in data:
                    raise NotACheckpoint(f"{self.location.name_url(name + '/' + e)}: not a ctm-dist extra state")
                states.append(data["state"])

            tag = name
            if universal:
                tag = self._to_universal(ds_dir)
            self._engine_load(engine, ds_dir.parent, tag, universal, load_optimizer_states)
        finally:
            self._clean(work)
        self.loaded_step = step
        return states if all_ranks else states[0]

    def load_latest(self, engine, config: dict | None = None, all_ranks: bool = False):
        """``(step, extra_state)`` of the newest commit loaded into ``engine``, or None if there is none."""
        step = self.latest_committed()
        if step is None:
            return None
        return step, self.load(engine, step, config=config, all_ranks=all_ranks)

    # ------------------------------------------------------------------ internals
    def _engine_load(self, engine, load_dir: Path, tag: str, universal: bool, load_optimizer_states: bool):
        cfg = engine._config
        previous = cfg.load_universal_checkpoint
        cfg.load_universal_checkpoint = universal  # read by load_checkpoint at call time
        try:
            path, _client = engine.load_checkpoint(os.fspath(load_dir), tag=tag, load_module_strict=True,
                                                   load_optimizer_states=load_optimizer_states,
                                                   load_lr_scheduler_states=load_optimizer_states)
        except (RuntimeError, KeyError, AssertionError) as e:
            raise CheckpointError(f"DeepSpeed could not load {tag}: {type(e).__name__}: "
                                  f"{' '.join(str(e).split())[:400]}") from e
        finally:
            cfg.load_universal_checkpoint = previous
        if path is None:
            raise NotACheckpoint(f"DeepSpeed found no checkpoint for tag {tag} in the downloaded files")

    def _to_universal(self, ds_dir: Path) -> str:
        """Convert the downloaded ZeRO checkpoint with DeepSpeed's ds_to_universal; return the new tag."""
        from deepspeed.checkpoint import ds_to_universal

        tag = ds_dir.name + "-universal"
        args = argparse.Namespace(input_folder=os.fspath(ds_dir), output_folder=os.fspath(ds_dir.parent / tag),
                                  num_extract_workers=1, num_merge_workers=1, keep_temp_folder=False,
                                  strict=True, inject_missing_state=True)
        with contextlib.redirect_stdout(io.StringIO()):
            ds_to_universal.main(args)
        return tag

    def _check_model_config(self, commit: dict, config: dict, name: str) -> None:
        saved = (commit.get("config") or {}).get("model")
        current = redact(config, self._secrets()).get("model") if isinstance(config, dict) else None
        if saved is None or current is None:
            return
        if saved != current:
            keys = sorted(set(saved) | set(current)) if isinstance(saved, dict) and isinstance(current, dict) else []
            diff = [f"{k}: {saved.get(k)!r} (checkpoint) != {current.get(k)!r} (now)"
                    for k in keys if saved.get(k) != current.get(k)]
            raise ConfigMismatch(f"{self.location.name_url(name)} was saved for another model config: "
                                 + ("; ".join(diff[:8]) or f"{saved!r} != {current!r}"))

    def _step_dirs(self) -> list[int]:
        try:
            names = self.location.list()
        except FileNotFoundError:
            return []
        return sorted(int(m.group(1)) for n in names if (m := _STEP_DIR.fullmatch(n)))

    def _clean(self, work: Path) -> None:
        shutil.rmtree(work, ignore_errors=True)
        if self._own_local_dir:
            with contextlib.suppress(OSError):  # still in use by another call: leave it
                self.local_dir.rmdir()

    def _secrets(self) -> tuple[str, ...]:
        loc = self.run_location
        return tuple(s for s in (loc.secret, loc.key, os.environ.get("AWS_SECRET_ACCESS_KEY"),
                                 os.environ.get("AWS_SESSION_TOKEN")) if s)

    def _remove_dir(self, name: str) -> None:
        loc = self.location
        with contextlib.suppress(FileNotFoundError):
            loc.rm(name, recursive=True)
        if loc.protocol == "s3":  # SeaweedFS keeps a "dir/" marker object that rm leaves behind
            bucket, _, key = loc.join(name).partition("/")
            with contextlib.suppress(FileNotFoundError):
                loc.call(lambda: loc.fs.call_s3("delete_object", Bucket=bucket, Key=key + "/"), name)

    def _has_valid_commit(self, step: int) -> bool:
        try:
            self.read_commit(step)
            return True
        except (NoCheckpoint, NotACheckpoint):
            return False  # a broken marker is debris: this save replaces it

    def _sizes(self, name: str) -> dict[str, int]:
        loc = self.location
        base = loc.join(name)

        def find():
            with contextlib.suppress(Exception):
                loc.fs.invalidate_cache(base)
            return loc.fs.find(base, detail=True)

        try:
            found = loc.call(find, name)
        except FileNotFoundError:
            return {}
        return {posixpath.relpath(p, base): int(info.get("size") or 0) for p, info in found.items()}

    def _sync_or_raise(self, error: BaseException | None, what: str, payload: Any = None) -> list:
        """Barrier that also tells every rank whether any rank failed; returns all ranks' payloads."""
        message = None if error is None else f"rank {self.rank}: {type(error).__name__}: {error}"
        import torch.distributed as dist

        if self._barrier is None and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            gathered: list = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, (message, payload))
            messages = [m for m, _ in gathered if m]
            payloads = [p for _, p in gathered]
        else:
            if self._barrier is not None:
                self._barrier()
            elif self.world_size > 1:
                raise CheckpointError(f"{self.world_size} ranks but no barrier: initialise torch.distributed "
                                      "or pass barrier=")
            messages, payloads = ([message] if message else []), [payload]
        if messages:
            raise CheckpointError(f"{what} failed ({'; '.join(messages)[:600]}); nothing was committed "
                                  "and the previous committed checkpoint stays valid") from error
        return payloads
