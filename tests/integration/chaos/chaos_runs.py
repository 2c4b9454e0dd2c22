"""Whole training runs for the chaos scenarios: one tiny config, run in this process (sharing one Ray
session), as a launcher subprocess (so that it can be signalled and its exit status read), or as the
ranks of the training loop on a gloo group without Ray (:class:`Ranks`, one process per rank, to be
killed at exact points); plus bitwise comparison of the tensors two runs committed.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import torch

REPO = Path(__file__).resolve().parents[3]
STEPS = 16  # steps of every whole run compared with the reference

# A CTM small enough for a few dozen steps in seconds on two cores: no conv backbone, 2 ticks.
# Dropout is on (and the demo's training augmentation is), so that a resume that did not restore
# every rank's RNG state or data position would follow another trajectory than the reference.
TINY_MODEL = {
    "dropout": 0.1,
    "iterations": 2,
    "d_model": 32,
    "d_input": 16,
    "heads": 2,
    "n_synch_out": 16,
    "n_synch_action": 16,
    "memory_length": 2,
    "memory_hidden_dims": 2,
    "backbone_type": "none",
}


def tiny_overrides(
    *,
    name: str,
    storage: str,
    data: str,
    local_dir: str | os.PathLike,
    steps: int,
    workers: int = 2,
    checkpoint_every: int = 2,
    max_failures: int = 3,
    **extra,
) -> list[str]:
    """Dotted overrides of a tiny demo run; ``extra`` adds more (``section__field=value``)."""
    out = [
        f"run.name={name}",
        f"run.storage={storage}",
        f"run.local_dir={local_dir}",
        "run.seed=7",
        f"run.max_steps={steps}",
        "run.log_every=1",
        f"data.url={data}",
        "data.task=demo",
        "data.batch_size=8",
        "data.eval_batch_size=8",
        "data.image_size=16",
        "data.num_workers=0",
        "optim.warmup_steps=2",
        f"optim.decay_steps={max(steps, 1)}",
        "optim.lr=3e-3",
        "deepspeed.zero_stage=2",
        "deepspeed.precision=bf16",
        "deepspeed.gradient_clipping=1.0",
        f"checkpoint.every={checkpoint_every}",
        "checkpoint.keep=100",
        "eval.every=0",
        "eval.batches=1",
        f"scale.workers={workers}",
        "scale.cpus_per_worker=1",
        f"scale.max_failures={max_failures}",
    ]
    out += [f"model.{k}={v}" for k, v in TINY_MODEL.items()]
    out += [f"{k.replace('__', '.')}={v}" for k, v in extra.items()]
    return out


def tiny_config(**kwargs):
    from ctm_dist.train.cli import TASK_DEFAULTS
    from ctm_dist.train.config import build_config

    return build_config(overrides=tiny_overrides(**kwargs), base=TASK_DEFAULTS["demo"])


def run_in_process(cfg, stream) -> dict:
    """``ctm_dist.train.driver.train`` on the Ray session already initialised in this process."""
    from ctm_dist.train.driver import train

    return train(cfg, stream=stream, interactive=False)


def launcher(
    overrides: list[str],
    ray_address: str,
    env: dict[str, str],
    log_path: str | os.PathLike,
) -> subprocess.Popen:
    """The launchers' command line (``ctm_dist.train.cli.main('demo')``) as a subprocess whose
    stdout+stderr go to ``log_path``; it joins the Ray cluster at ``ray_address``."""
    code = "import sys; from ctm_dist.train.cli import main; sys.exit(main('demo'))"
    full_env = dict(os.environ)
    full_env.update(env)
    full_env.update(
        {"RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0", "PYTHONUNBUFFERED": "1"}
    )
    full_env.pop("RAY_ADDRESS", None)
    log = open(log_path, "ab")
    try:
        return subprocess.Popen(
            [sys.executable, "-c", code, "--quiet", "--ray-address", ray_address, *overrides],
            cwd=REPO,
            env=full_env,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
    finally:
        log.close()


# ---------------------------------------------------------------- what a checkpoint holds


def checkpoint_tensors(run_location, step: int) -> dict[str, torch.Tensor]:
    """Every tensor of every ``.pt``/``.safetensors`` file of committed checkpoint ``step``,
    keyed ``file:path.to.tensor`` (read from storage directly, ``weights_only=True``)."""
    folder = run_location.child("checkpoints").child(f"step-{step:09d}")
    files = folder.call(lambda: folder.fs.find(folder.path), "")
    out: dict[str, torch.Tensor] = {}
    for path in sorted(files):
        rel = os.path.relpath(path, folder.path)
        if rel.endswith(".pt"):
            _walk(load_weights_only(folder.read_bytes(rel)), rel + ":", out)
        elif rel.endswith(".safetensors"):
            from safetensors.torch import load

            for k, v in load(folder.read_bytes(rel)).items():
                out[f"{rel}:{k}"] = v
    return out


def load_weights_only(data: bytes):
    """The checkpointer's own ``safe_load`` (``torch.load(weights_only=True)`` plus DeepSpeed's
    plain-data classes) on bytes."""
    import tempfile

    from ctm_dist.train.checkpointer import safe_load

    with tempfile.NamedTemporaryFile(suffix=".pt") as f:
        f.write(data)
        f.flush()
        return safe_load(f.name)


def _walk(obj, prefix: str, out: dict) -> None:
    if isinstance(obj, torch.Tensor):
        out[prefix] = obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            _walk(v, f"{prefix}{k}.", out)
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            _walk(v, f"{prefix}{i}.", out)


def model_tensors(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The model weights among a checkpoint's tensors (the DeepSpeed ``module`` state)."""
    return {
        k: v
        for k, v in tensors.items()
        if ".module." in k or k.split(":", 1)[1].startswith("module.")
    }


def bitwise_differences(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> list[str]:
    """Names whose tensors differ in any bit (or exist on one side only)."""
    diffs = sorted(set(a) ^ set(b))
    for k in sorted(set(a) & set(b)):
        x, y = a[k], b[k]
        if x.dtype != y.dtype or x.shape != y.shape:
            diffs.append(k)
        elif x.numel() and not torch.equal(_bits(x), _bits(y)):
            diffs.append(k)
    return diffs


def _bits(t: torch.Tensor) -> torch.Tensor:
    t = t.detach().contiguous().cpu()
    if t.is_floating_point():
        return t.view({2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])
    return t


# ---------------------------------------------------------------- ranks of the loop without Ray

TRAINER_CHILD = Path(__file__).with_name("trainer_child.py")


class Ranks:
    """The ranks of one launch of ``trainer_child.py`` (the real training loop on a gloo group, one
    process per rank), started at once. Their ``CHAOS`` lines are collected as they come; waits
    are on those lines and on the processes' states, never on elapsed time."""

    def __init__(self, spec: dict, world_size: int, env: dict[str, str], log_dir, label: str):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        full = dict(os.environ)
        full.update(env)
        full.update(PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
        self.label, self.events = label, []
        self.cond = threading.Condition()
        self.logs = [Path(log_dir) / f"{label}-rank{r}.log" for r in range(world_size)]
        self.procs: list[subprocess.Popen] = []
        self._readers = []
        for rank in range(world_size):
            with open(self.logs[rank], "wb") as err:
                proc = subprocess.Popen(
                    [sys.executable, str(TRAINER_CHILD), str(rank), str(world_size), str(port)]
                    + [json.dumps(spec)],
                    cwd=REPO,
                    env=full,
                    stdout=subprocess.PIPE,
                    stderr=err,
                    stdin=subprocess.DEVNULL,
                    text=True,
                )
            self.procs.append(proc)
            t = threading.Thread(target=self._read, args=(proc,), daemon=True)
            t.start()
            self._readers.append(t)

    def _read(self, proc) -> None:
        for line in proc.stdout:
            if line.startswith("CHAOS "):
                event = json.loads(line[6:])
                event["t"] = time.monotonic()
                with self.cond:
                    self.events.append(event)
                    self.cond.notify_all()
        with self.cond:
            self.cond.notify_all()

    def wait_event(self, kind: str, timeout: float = 300.0, **match) -> dict:
        """The first ``kind`` line whose fields include ``match``; fails if every rank has exited
        without one."""

        def found():
            for e in self.events:
                if e["kind"] == kind and all(e.get(k) == v for k, v in match.items()):
                    return e
            return None

        with self.cond:
            ok = self.cond.wait_for(
                lambda: found() or all(p.poll() is not None for p in self.procs), timeout
            )
            event = found()
        if event is None:
            state = "every rank exited" if ok else f"timed out after {timeout:.0f}s"
            raise AssertionError(
                f"{self.label}: no {kind} {match} ({state}; exit codes {self.returncodes()})\n"
                + self.stderr_tail()
            )
        return event

    def wait_paused(self, rank: int, at: str, timeout: float = 300.0) -> dict:
        """Wait until ``rank`` said it pauses at ``at`` and the kernel shows it stopped."""
        event = self.wait_event("paused", timeout, rank=rank, at=at)
        proc = psutil.Process(self.procs[rank].pid)
        deadline = time.monotonic() + timeout
        while proc.status() != psutil.STATUS_STOPPED:
            assert time.monotonic() < deadline, f"{self.label}: rank {rank} did not stop"
            time.sleep(0.01)
        return event

    def signal(self, rank: int, sig: int) -> None:
        self.procs[rank].send_signal(sig)

    def resume(self, rank: int) -> None:
        self.procs[rank].send_signal(signal.SIGCONT)

    def kill_all(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.kill()

    def wait(self, timeout: float = 300.0) -> list[int]:
        try:
            for p in self.procs:
                p.wait(timeout)
        finally:
            self.kill_all()
            for p in self.procs:
                p.wait()
            for t in self._readers:
                t.join(10)
        return self.returncodes()

    def returncodes(self) -> list[int | None]:
        return [p.poll() for p in self.procs]

    def of(self, kind: str) -> list[dict]:
        with self.cond:
            return [e for e in self.events if e["kind"] == kind]

    def stderr_tail(self, chars: int = 3000) -> str:
        return "\n".join(
            f"--- rank {r} ---\n" + log.read_text(errors="replace")[-chars:]
            for r, log in enumerate(self.logs)
            if log.exists()
        )
