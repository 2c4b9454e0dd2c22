"""The Ray driver: storage and data set-up, Ray connection, TorchTrainer, progress display, summary.

``train(cfg)`` runs one training job and returns its summary. With ``run.storage`` empty it starts
the embedded :class:`~ctm_dist.storage.LocalObjectStore` under ``run.local_dir``; with the demo
task and no ``data.url`` it writes the demo shards into the run store first. Credentials travel to
the workers only through Ray's in-memory object store (``ray.put``): never as ``runtime_env``
variables, which Ray writes to its logs and to the workers' command lines.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import threading
import time

import ray

from ctm_dist.train.config import TrainConfig
from ctm_dist.train.metrics import format_line
from ctm_dist.train.tasks import preflight

log = logging.getLogger("ctm_dist.train")

EMBEDDED_BUCKET = "ctm-dist"
DEMO_DATA = "demo-data"
CREDENTIAL_VARS = ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN",
                   "AWS_REGION", "AWS_DEFAULT_REGION", "GOOGLE_APPLICATION_CREDENTIALS")


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


# ---------------------------------------------------------------- storage and data


@contextlib.contextmanager
def prepared_storage(cfg: TrainConfig):
    """Yield (cfg with storage/data URLs filled in, env vars for the workers)."""
    from ctm_dist.storage import LocalObjectStore, Location

    env = {k: os.environ[k] for k in CREDENTIAL_VARS if os.environ.get(k)}
    with contextlib.ExitStack() as stack:
        if not cfg.run.storage:
            data_dir = os.path.join(os.path.abspath(cfg.run.local_dir), "object-store")
            store = stack.enter_context(LocalObjectStore(data_dir))
            store.create_bucket(EMBEDDED_BUCKET)
            env.update(store.env())
            stack.enter_context(_environ(store.env()))  # this process reads and writes the store too
            cfg.run.storage = f"s3://{EMBEDDED_BUCKET}/runs"
            log.info("embedded object store at %s (data in %s)", store.endpoint_url, data_dir)
        if cfg.data.task == "demo" and not cfg.data.url:
            # beside the runs: {storage}/demo-data/ (no run may take that name then)
            cfg.data.url = Location.parse(cfg.run.storage).child(DEMO_DATA).url
            if cfg.run.name == DEMO_DATA:
                raise ValueError(f"run.name {DEMO_DATA!r} is where the demo shards go; choose another name")
            ensure_demo_shards(cfg.data.url)
        yield cfg, env


@contextlib.contextmanager
def _environ(values: dict[str, str]):
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def ensure_demo_shards(url: str) -> None:
    from ctm_dist.data.demo_writer import write_demo_shards
    from ctm_dist.storage import Location

    loc = Location.parse(url)
    if loc.exists("train.json") and loc.exists("val.json"):
        return
    t0 = time.perf_counter()
    write_demo_shards(loc)
    log.info("wrote the demo shards to %s in %.1fs", url, time.perf_counter() - t0)


# ---------------------------------------------------------------- Ray


def connect_ray(address: str | None) -> bool:
    """Connect to the cluster at ``address`` or $RAY_ADDRESS (set by `ray job submit`), else start a private local one.

    A cluster that merely happens to run on this machine is never joined implicitly.

    Returns True when this call started Ray (so the caller shuts it down)."""
    if ray.is_initialized():
        return False
    address = address or os.environ.get("RAY_ADDRESS")
    if address and address != "local":
        ray.init(address=address, log_to_driver=True)
        return True
    ray.init(configure_logging=False)
    return True


def _trainer(cfg: TrainConfig, progress, env: dict[str, str]):
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from ctm_dist.train.loop import train_worker
    from ctm_dist.train.preemption import WorkerSignals

    sc = cfg.scale
    resources = {"CPU": sc.cpus_per_worker}
    if sc.gpus_per_worker:
        resources["GPU"] = sc.gpus_per_worker
    return TorchTrainer(
        train_worker,
        train_loop_config={"config": cfg.to_dict(), "progress": progress,
                           "credentials": ray.put(env),  # a reference: the values stay in memory
                           "signals": WorkerSignals(cfg.run.preemption_signals, cfg.run.preemption_grace_s)},
        scaling_config=ScalingConfig(num_workers=sc.workers, use_gpu=sc.gpus_per_worker > 0,
                                     resources_per_worker=resources),
        run_config=RunConfig(name=cfg.run.name,
                             storage_path=os.path.join(os.path.abspath(cfg.run.local_dir), "ray"),
                             failure_config=FailureConfig(max_failures=sc.max_failures)),
    )


# ---------------------------------------------------------------- progress display


class Display:
    """tqdm bar when interactive, else one readable line per log interval."""

    def __init__(self, max_steps: int, interactive: bool | None = None, stream=None):
        self.stream = stream or sys.stderr
        self.interactive = self.stream.isatty() if interactive is None else interactive
        self.max_steps = max_steps
        self.bar = None
        if self.interactive:
            from tqdm import tqdm

            self.bar = tqdm(total=max_steps, file=self.stream, dynamic_ncols=True, desc="train")

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
        if self.bar is not None:
            self.bar.n = step
            post = {}
            for key, label, fmt in (("train/loss", "loss", "{:.3f}"), ("train/accuracy", "acc", "{:.3f}"),
                                    ("perf/samples_per_s", "samples/s", "{:.0f}"), ("eval/top1", "val", "{:.3f}")):
                if key in e:
                    post[label] = fmt.format(e[key])
            self.bar.set_postfix(post, refresh=False)
            self.bar.refresh()
            if any(k.startswith("eval/") for k in e):
                self.bar.write(format_line(step, self.max_steps, e))
        else:
            self.write(format_line(step, self.max_steps, e))

    def write(self, line: str) -> None:
        if self.bar is not None:
            self.bar.write(line)
        else:
            print(line, file=self.stream, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


# ---------------------------------------------------------------- entry point


def train(cfg: TrainConfig, *, ray_address: str | None = None, interactive: bool | None = None,
          stream=None) -> dict:
    """Run a validated config to the end; returns the summary of rank 0 (plus wall time)."""
    started = time.perf_counter()
    cfg.run.local_dir = os.path.abspath(cfg.run.local_dir)  # workers run in Ray's own working directory
    with prepared_storage(cfg) as (cfg, env):
        preflight(cfg)
        owns_ray = connect_ray(ray_address)
        try:
            progress = Progress.remote()
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
    if summary.get("preempted"):
        from ctm_dist.train.preemption import Preempted

        raise Preempted(summary.get("step"), summary.get("signal"))
    return summary


def _relay_signals(progress, signals: str):
    """Forward the preemption signals sent to the driver to the workers (via the progress actor)."""
    import signal

    from ctm_dist.train.preemption import handle_signals, parse_signals

    if threading.current_thread() is not threading.main_thread():
        return lambda: None

    def on_signal(signum, frame):
        log.warning("got %s: asking the workers to checkpoint and stop", signal.Signals(signum).name)
        progress.request_stop.remote(signum)

    return handle_signals(parse_signals(signals), on_signal)


def summary_lines(summary: dict) -> list[str]:
    """The short end-of-run report."""
    lines = [f"run {summary.get('run')}: {summary.get('step')} steps in {summary.get('wall_s', 0):.0f}s "
             f"({summary.get('steps_per_s', 0):.2f} steps/s while training)"]
    for key, label in (("eval/top1", "val top-1"), ("eval/top5", "val top-5"),
                       ("eval/step_accuracy", "val per-step accuracy"), ("eval/route_accuracy", "val route accuracy"),
                       ("eval/sequence_accuracy", "val sequence accuracy"),
                       ("eval/most_certain_tick_mean", "mean most-certain tick")):
        if summary.get(key) is not None:
            lines.append(f"  {label}: {summary[key]:.4f}" if "tick" not in key else f"  {label}: {summary[key]:.2f}")
    if summary.get("resumed_from"):
        lines.append(f"  resumed from step {summary['resumed_from']}")
    lines.append(f"  checkpoints: {summary.get('checkpoints')}")
    lines.append(f"  TensorBoard: {summary.get('tensorboard_local')} (synced to {summary.get('tensorboard')})")
    return lines
