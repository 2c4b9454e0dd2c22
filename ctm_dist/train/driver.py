"""The Ray driver: storage and data set-up, Ray connection, TorchTrainer, progress display, summary.

``train(cfg)`` runs one training job and returns its summary. With ``run.storage`` empty it starts
the embedded :class:`~ctm_dist.storage.LocalObjectStore` under ``run.local_dir`` (one launcher at a
time per directory: a lock file says which); with the demo task and no ``data.url`` it writes the
demo shards into the run store first. The embedded store's keys live in a 0600 shared-credentials
file (``AWS_SHARED_CREDENTIALS_FILE``) that botocore reads itself, so no process environment (the
driver's, Ray's GCS, raylet and dashboard, the workers') holds the secret. A user's own storage
settings travel to the workers only through Ray's in-memory object store (``ray.put``): never as
``runtime_env`` variables, which Ray writes to its logs and to the workers' command lines.

Before anything starts, input that cannot work is refused with one line (:class:`LaunchRefused`):
more workers than Ray has CPUs/GPUs for, a second launcher on the same embedded store, ``s3://``
data with the embedded store (whose endpoint would replace the user's). A run whose newest
committed checkpoint is already at ``run.max_steps`` returns at once without starting Ray.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
import signal
import sys
import threading
import time

import ray
import torch

from ctm_dist.data.demo_writer import write_demo_shards
from ctm_dist.eval.commands import next_commands
from ctm_dist.storage import Location
from ctm_dist.storage.local import (
    EMBEDDED_BUCKET,
    DirectoryLocked,
    LocalObjectStore,
    environ,
    lock_directory,
)
from ctm_dist.tasks import get_task, make_task, preflight
from ctm_dist.train.checkpointer import Checkpointer
from ctm_dist.train.config import TrainConfig
from ctm_dist.train.init_from import InitError, absolute_source, initial_model
from ctm_dist.train.lease import live_writer
from ctm_dist.train.loop import train_worker
from ctm_dist.train.metrics import config_text, format_line
from ctm_dist.train.preemption import Preempted, WorkerSignals, handle_signals, parse_signals

log = logging.getLogger("ctm_dist.train")

DEMO_DATA = "demo-data"
CREDENTIAL_VARS = (
    "AWS_ENDPOINT_URL",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_REGION",
    "AWS_DEFAULT_REGION",
    "GOOGLE_APPLICATION_CREDENTIALS",
)
EMBEDDED_PROFILE = "ctm-dist-embedded"  # the profile in the embedded store's credentials file
CONFIG_FILE = "config.yaml"  # the resolved config, saved beside the run's checkpoints


def check_init_from(cfg: TrainConfig) -> None:
    """Refuse, before any worker starts, fine-tuning weights that cannot start this run."""
    if not cfg.model.init_from:
        return
    task_cfg = make_task(cfg, rank=0, world_size=1).model_config()
    try:
        initial_model(cfg.model.init_from, cfg.model.kind, task_cfg)
    except InitError as err:
        raise LaunchRefused(str(err)) from None


class LaunchRefused(Exception):
    """Input or surroundings that cannot work, found before any worker starts; one line."""


@ray.remote(num_cpus=0)
class Progress:
    """Rank 0 pushes metrics here; the driver polls them for its progress bar and log lines."""

    def __init__(self):
        self.events: list[dict] = []
        self.stop_signal: int | None = None

    def update(self, payload: dict) -> None:
        self.events.append(payload)

    def request_stop(self, signum: int) -> None:
        self.stop_signal = self.stop_signal or int(signum)

    def stop_requested(self) -> int | None:
        return self.stop_signal

    def since(self, index: int) -> list[dict]:
        return self.events[index:]


def progress_actor():
    """A :class:`Progress` actor on the driver's own node.

    It holds the run's progress and stop requests; on another node it would die with that node
    and take the run with it, while the driver's node (like Ray Train's controller, which Ray
    pins there too) lives as long as the run does.
    """
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = ray.get_runtime_context().get_node_id()
    return Progress.options(
        scheduling_strategy=NodeAffinitySchedulingStrategy(node_id=here, soft=False)
    ).remote()


# ---------------------------------------------------------------- storage and data


def check_data_access(cfg: TrainConfig) -> None:
    """``s3://`` data needs the user's endpoint and keys, which the embedded store's would replace."""
    url = cfg.data.url
    if cfg.run.storage or not url.startswith(("s3://", "s3a://")):
        return
    bucket = url.split("://", 1)[1].split("/", 1)[0]
    if bucket != EMBEDDED_BUCKET:
        raise LaunchRefused(
            f"--data {url} is read with your own S3 endpoint and keys, but without --storage the runs go to "
            f"the embedded object store, whose endpoint and keys would replace yours: pass --storage "
            f"s3://BUCKET/runs (on the same S3 as the data)"
        )


def check_resources(cfg: TrainConfig, available: dict, where: str) -> None:
    """Refuse a worker group that ``available`` (Ray's resource totals) cannot hold."""
    sc = cfg.scale
    for resource, per_worker, knob in (
        ("CPU", sc.cpus_per_worker, "scale.cpus_per_worker"),
        ("GPU", sc.gpus_per_worker, "--gpus-per-worker"),
    ):
        need, have = sc.workers * per_worker, float(available.get(resource, 0))
        if need > have:
            raise LaunchRefused(
                f"--workers {sc.workers} x {per_worker:g} {resource} per worker needs {need:g} "
                f"{resource}s, but {where} has {have:g}; lower --workers or {knob}"
            )


def local_resources() -> dict:
    """What a private local Ray started by :func:`connect_ray` will have."""
    from ray._private.utils import get_num_cpus

    return {
        "CPU": get_num_cpus(),
        "GPU": torch.cuda.device_count() if torch.cuda.is_available() else 0,
    }


def _write_credentials_file(store: LocalObjectStore, directory: str) -> str:
    path = os.path.join(directory, "aws-credentials")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(
            f"[{EMBEDDED_PROFILE}]\naws_access_key_id = {store.access_key}\n"
            f"aws_secret_access_key = {store.secret_key}\n"
        )
    os.chmod(path, 0o600)
    return path


def embedded_env(store: LocalObjectStore, directory: str) -> dict[str, str]:
    """Variables pointing botocore (s3fs, :class:`Location`) at the embedded store without its secret.

    The user's own keys are blanked (botocore treats empty variables as unset) since they would
    win over the credentials file.
    """
    return {
        "AWS_ENDPOINT_URL": store.endpoint_url,
        "AWS_ENDPOINT_URL_S3": store.endpoint_url,
        "AWS_REGION": "us-east-1",
        "AWS_SHARED_CREDENTIALS_FILE": _write_credentials_file(store, directory),
        "AWS_PROFILE": EMBEDDED_PROFILE,
        "AWS_ACCESS_KEY_ID": "",
        "AWS_SECRET_ACCESS_KEY": "",
        "AWS_SESSION_TOKEN": "",
    }


@contextlib.contextmanager
def prepared_storage(cfg: TrainConfig, local_dir_name: str | None = None):
    """Yield (cfg with storage/data URLs filled in, env vars for the workers)."""
    env = {k: os.environ[k] for k in CREDENTIAL_VARS if os.environ.get(k)}
    with contextlib.ExitStack() as stack:
        if not cfg.run.storage:
            local_dir = os.path.abspath(cfg.run.local_dir)
            try:
                stack.enter_context(lock_directory(local_dir))
            except DirectoryLocked as e:
                raise LaunchRefused(
                    f"another launcher (pid {e.pid}) is using {local_dir_name or local_dir}; "
                    f"wait for it to finish, or pass --storage"
                ) from None
            data_dir = os.path.join(local_dir, "object-store")
            store = stack.enter_context(LocalObjectStore(data_dir))
            store.create_bucket(EMBEDDED_BUCKET)
            env = embedded_env(store, data_dir)
            stack.enter_context(environ(env))  # this process reads and writes the store too
            cfg.run.storage = f"s3://{EMBEDDED_BUCKET}/runs"
            log.info("embedded object store at %s (data in %s)", store.endpoint_url, data_dir)
        if get_task(cfg.data.task).built_in_data and not cfg.data.url:
            # beside the runs: {storage}/demo-data/ (no run may take that name then)
            cfg.data.url = Location.parse(cfg.run.storage).child(DEMO_DATA).url
            if cfg.run.name == DEMO_DATA:
                raise ValueError(
                    f"run.name {DEMO_DATA!r} is where the demo shards go; choose another name"
                )
            ensure_demo_shards(cfg.data.url)
        yield cfg, env


def refuse_a_second_writer(cfg: TrainConfig) -> None:
    """One job writes a run: refuse while another job renews the run's lease (ctm_dist.train.lease)."""
    checkpoints = Location.parse(cfg.run.storage).child(cfg.run.name).child("checkpoints")
    doc = live_writer(checkpoints)
    if doc is not None:
        raise LaunchRefused(
            f"run {cfg.run.name} is being trained by another job (host {doc.get('host', '?')}, "
            f"pid {doc.get('pid', '?')}); wait for it to finish, or choose another --name"
        )


def completed_step(cfg: TrainConfig) -> int | None:
    """The newest committed step when it is already at ``run.max_steps`` (nothing left to train)."""
    location = Location.parse(cfg.run.storage, retry_deadline=cfg.run.storage_retry_deadline).child(
        cfg.run.name
    )
    latest = Checkpointer(location).latest_committed()
    return latest if latest is not None and latest >= cfg.run.max_steps else None


def save_config(cfg: TrainConfig) -> None:
    """``{storage}/{run}/config.yaml``: the resolved config (URLs without credentials) for whoever reads the run."""
    location = Location.parse(cfg.run.storage, retry_deadline=cfg.run.storage_retry_deadline).child(
        cfg.run.name
    )
    location.write_bytes(CONFIG_FILE, config_text(cfg).encode())


def ensure_demo_shards(url: str) -> None:
    loc = Location.parse(url)
    if loc.exists("train.json") and loc.exists("val.json"):
        return
    t0 = time.perf_counter()
    write_demo_shards(loc)
    log.info("wrote the demo shards to %s in %.1fs", url, time.perf_counter() - t0)


# ---------------------------------------------------------------- Ray


def cluster_address(address: str | None) -> str | None:
    """The cluster to join (``None``: a private local one)."""
    address = address or os.environ.get("RAY_ADDRESS")
    return address if address and address != "local" else None


def connect_ray(address: str | None, log_to_driver: bool = True) -> bool:
    """Connect to the cluster at ``address`` or $RAY_ADDRESS (set by `ray job submit`), else start a private local one.

    A cluster that merely happens to run on this machine is never joined implicitly.

    Returns True when this call started Ray (so the caller shuts it down)."""
    if ray.is_initialized():
        return False
    address = cluster_address(address)
    if address:
        ray.init(address=address, log_to_driver=log_to_driver)
        return True
    ray.init(configure_logging=False, log_to_driver=log_to_driver)
    return True


def _trainer(cfg: TrainConfig, progress, env: dict[str, str]):
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    sc = cfg.scale
    resources = {"CPU": sc.cpus_per_worker}
    if sc.gpus_per_worker:
        resources["GPU"] = sc.gpus_per_worker
    return TorchTrainer(
        train_worker,
        train_loop_config={
            "config": cfg.to_dict(),
            "progress": progress,
            "credentials": ray.put(env),  # a reference: the values stay in memory
            "signals": WorkerSignals(cfg.run.preemption_signals, cfg.run.preemption_grace_s),
        },
        scaling_config=ScalingConfig(
            num_workers=sc.workers, use_gpu=sc.gpus_per_worker > 0, resources_per_worker=resources
        ),
        run_config=RunConfig(
            name=cfg.run.name,
            storage_path=os.path.join(os.path.abspath(cfg.run.local_dir), "ray"),
            failure_config=FailureConfig(max_failures=sc.max_failures),
        ),
    )


# ---------------------------------------------------------------- progress display


TICK_NOTE = (
    "tick: the mean internal tick (of model.iterations) at which the model was most certain; "
    "eta: from the training steps' rate so far (start-up left out); mem: peak memory of rank 0 "
    "(CUDA when on GPU, else the process's RSS)"
)


def _clock(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class Display:
    """tqdm bar when interactive, else one readable line per log interval.

    Each line ends with the wall-clock time, the time since launch and an ETA from the rate of the
    training steps seen so far (the first one sets the clock, so start-up does not count).
    """

    def __init__(self, max_steps: int, interactive: bool | None = None, stream=None):
        self.stream = stream or sys.stderr
        self.interactive = self.stream.isatty() if interactive is None else interactive
        self.max_steps = max_steps
        self.bar = None
        self.started = time.monotonic()
        self._first: tuple[float, int] | None = None  # (time, step) of the first training line
        self._explained = False
        if self.interactive:
            from tqdm import tqdm

            self.bar = tqdm(total=max_steps, file=self.stream, dynamic_ncols=True, desc="train")

    def eta(self, step: int, now: float) -> float | None:
        if self._first is None:
            self._first = (now, step)
            return None
        t0, s0 = self._first
        if step <= s0 or now <= t0:
            return None
        return (self.max_steps - step) * (now - t0) / (step - s0)

    def line(self, step: int, values: dict, now: float | None = None) -> str:
        now = time.monotonic() if now is None else now
        eta = self.eta(step, now) if "train/loss" in values else None
        stamp = datetime.datetime.now().strftime("%Y-%m-%d %H:%M:%S")
        tail = f" | {stamp} | elapsed {_clock(now - self.started)}" + (
            f" | eta {_clock(eta)}" if eta is not None else ""
        )
        return (
            format_line(step, self.max_steps, values) + tail
        )  # starts with "step N/M", as scripts expect

    def event(self, e: dict) -> None:
        step = int(e.get("step", 0))
        if "resumed_from" in e and "train/loss" not in e and not e.get("final"):
            if e.get("resumed_from"):
                self.write(f"resuming from checkpoint at step {e['resumed_from']}")
            if self.bar is not None:
                self.bar.n = step
                self.bar.refresh()
            return
        if e.get("final"):
            return
        if not self._explained and "train/loss" in e:
            self._explained = True
            self.write(TICK_NOTE)
        line = self.line(step, e)
        if self.bar is not None:
            self.bar.n = step
            post = {}
            for key, label, fmt in (
                ("train/loss", "loss", "{:.3f}"),
                ("train/accuracy", "acc", "{:.3f}"),
                ("perf/samples_per_s", "samples/s", "{:.0f}"),
                ("eval/top1", "val", "{:.3f}"),
                ("perf/peak_memory_gib", "mem GiB", "{:.2f}"),
            ):
                if key in e:
                    post[label] = fmt.format(e[key])
            self.bar.set_postfix(post, refresh=False)
            self.bar.refresh()
            if any(k.startswith("eval/") for k in e):
                self.bar.write(line)
        else:
            self.write(line)

    def write(self, line: str) -> None:
        if self.bar is not None:
            self.bar.write(line)
        else:
            print(line, file=self.stream, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


# ---------------------------------------------------------------- entry point


def train(
    cfg: TrainConfig,
    *,
    ray_address: str | None = None,
    interactive: bool | None = None,
    stream=None,
    verbose: bool = True,
) -> dict:
    """Run a validated config to the end; returns the summary of rank 0 (plus wall time).

    Raises :class:`LaunchRefused` for input that cannot work (nothing started or left behind) and
    :class:`~ctm_dist.train.preemption.Preempted` after a signalled stop committed its checkpoint.
    ``verbose=False`` keeps the workers' own output (Ray Train, DeepSpeed) out of this process's.
    """
    started = time.perf_counter()
    embedded = not cfg.run.storage
    local_dir_name = cfg.run.local_dir
    cfg.run.local_dir = os.path.abspath(
        cfg.run.local_dir
    )  # workers run in Ray's own working directory
    cfg.model.init_from = absolute_source(cfg.model.init_from)
    if cfg.scale.gpus_per_worker == 0 and torch.cuda.is_available():
        print(
            "warning: this machine has CUDA GPUs but --gpus-per-worker is 0: the run trains on CPU",
            file=stream or sys.stderr,
            flush=True,
        )
    check_data_access(cfg)
    joining = cluster_address(ray_address)
    if not joining and not ray.is_initialized():
        check_resources(cfg, local_resources(), "this machine")
    with prepared_storage(cfg, local_dir_name) as (cfg, env):
        done = completed_step(cfg)
        if done is not None:
            return {
                "run": cfg.run.name,
                "step": done,
                "already_complete": True,
                "max_steps": cfg.run.max_steps,
                "checkpoints": Location.parse(cfg.run.storage)
                .child(cfg.run.name)
                .child("checkpoints")
                .url,
                "wall_s": time.perf_counter() - started,
            }
        preflight(cfg)
        check_init_from(cfg)
        refuse_a_second_writer(cfg)
        save_config(cfg)
        owns_ray = connect_ray(ray_address, log_to_driver=verbose)
        try:
            if joining:
                check_resources(cfg, ray.cluster_resources(), f"the Ray cluster at {joining}")
            progress = progress_actor()
            display = Display(cfg.run.max_steps, interactive, stream)
            outcome: dict = {}

            def fit():
                try:
                    outcome["result"] = _trainer(cfg, progress, env).fit()
                except BaseException as e:  # surfaced on the main thread
                    outcome["error"] = e

            restore_signals = _relay_signals(progress, cfg.run.preemption_signals)
            thread = threading.Thread(target=fit, name="ray-train-fit", daemon=True)
            thread.start()
            seen, summary = 0, {}
            try:
                while True:
                    alive = thread.is_alive()
                    events = ray.get(progress.since.remote(seen))
                    seen += len(events)
                    for e in events:
                        if e.get("final"):
                            summary = e
                        display.event(e)
                    if not alive:
                        break
                    thread.join(timeout=1.0)
            finally:
                display.close()
                restore_signals()
            if "error" in outcome:
                raise outcome["error"]
        finally:
            if owns_ray:
                ray.shutdown()
    summary = dict(summary)
    summary["wall_s"] = time.perf_counter() - started
    summary["run"] = cfg.run.name
    summary["next_commands"] = next_commands(
        Location.parse(cfg.run.storage).child(cfg.run.name).url,
        cfg.data.task,
        local_dir_name if embedded else None,
    )
    if summary.get("preempted"):
        raise Preempted(summary.get("step"), summary.get("signal"))
    return summary


def _relay_signals(progress, signals: str):
    """Forward the preemption signals (and Ctrl-C) sent to the driver to the workers (via the progress actor).

    A second Ctrl-C interrupts the driver at once.
    """
    if threading.current_thread() is not threading.main_thread():
        return lambda: None
    received: list[int] = []

    def on_signal(signum, frame):
        if signum == signal.SIGINT and received:
            raise KeyboardInterrupt
        received.append(signum)
        log.warning(
            "got %s: asking the workers to checkpoint and stop%s",
            signal.Signals(signum).name,
            " (Ctrl-C again to stop at once, without a checkpoint)"
            if signum == signal.SIGINT
            else "",
        )
        progress.request_stop.remote(signum)

    return handle_signals(
        tuple(dict.fromkeys(parse_signals(signals) + (signal.SIGINT,))), on_signal
    )


def summary_lines(summary: dict) -> list[str]:
    """The short end-of-run report."""
    if summary.get("already_complete"):
        return [
            f"run {summary.get('run')} is already complete at step {summary.get('step')} "
            f"(run.max_steps={summary.get('max_steps')}); raise --max-steps to train it further",
            f"  checkpoints: {summary.get('checkpoints')}",
        ]
    lines = [
        f"run {summary.get('run')}: {summary.get('step')} steps in {summary.get('wall_s', 0):.0f}s "
        f"({summary.get('steps_per_s', 0):.2f} steps/s while training)"
    ]
    for key, label in (
        ("eval/top1", "val top-1"),
        ("eval/top5", "val top-5"),
        ("eval/step_accuracy", "val per-step accuracy"),
        ("eval/route_accuracy", "val route accuracy"),
        ("eval/sequence_accuracy", "val sequence accuracy"),
        ("eval/most_certain_tick_mean", "mean most-certain tick"),
        ("eval/episode_return", "eval mean episode return"),
    ):
        if summary.get(key) is not None:
            lines.append(
                f"  {label}: {summary[key]:.4f}"
                if "tick" not in key
                else f"  {label}: {summary[key]:.2f}"
            )
    if summary.get("resumed_from"):
        lines.append(f"  resumed from step {summary['resumed_from']}")
    lines.append(f"  checkpoints: {summary.get('checkpoints')}")
    lines.append(
        f"  TensorBoard: {summary.get('tensorboard_local')} (synced to {summary.get('tensorboard')})"
    )
    if summary.get("next_commands"):
        lines.append("  next:")
        lines.extend(f"    {command}" for command in summary["next_commands"])
    return lines
