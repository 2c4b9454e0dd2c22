"""Whole training runs: Ray Train workers with DeepSpeed (gloo, CPU), checkpoints in the local S3 server.

* a 2-worker run (ZeRO-2, bf16, tick checkpointing) checkpoints into S3 and writes TensorBoard events
  that TensorBoard's own reader loads;
* relaunching a finished run under the same name with more steps resumes it, and with the same steps
  returns at once ("already complete") without starting workers;
* across the relaunch the losses equal those of an uninterrupted run, step for step.
"""

from __future__ import annotations

import io
import os

import pytest
import ray
from cluster_fixtures import TINY_MODEL

from ctm_dist.storage import Location
from ctm_dist.storage.checkpoints import committed_steps
from ctm_dist.storage.local import environ
from ctm_dist.train.config import build_config
from ctm_dist.train.driver import ensure_demo_shards, train
from ctm_dist.train.loop import run_paths


@pytest.fixture(scope="module")
def ray_session(object_store):
    """One local Ray for the module; workers get the S3 keys as runtime_env variables."""
    if ray.is_initialized():  # another module's session (the chaos suite's) is still up
        ray.shutdown()
    saved = {k: os.environ.get(k) for k in object_store.env()}
    os.environ.update(
        object_store.env()
    )  # the driver hands this process's AWS_* settings to its workers
    ray.init(
        num_cpus=2,
        include_dashboard=True,
        runtime_env={"env_vars": object_store.env()},
        configure_logging=False,
        log_to_driver=False,
    )
    yield
    ray.shutdown()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(scope="module")
def demo_data(object_store):
    object_store.create_bucket("train-demo-data")
    url = "s3://train-demo-data/demo"
    with environ(object_store.env()):
        ensure_demo_shards(url)
    return url


def _config(tmp_path, storage, data, name, steps, *extra):
    return build_config(
        None,
        [
            f"run.name={name}",
            f"run.storage={storage}",
            f"run.local_dir={tmp_path}",
            "run.seed=5",
            f"run.max_steps={steps}",
            "run.log_every=1",
            f"data.url={data}",
            "data.task=demo",
            "data.batch_size=8",
            "data.eval_batch_size=16",
            "data.image_size=8",
            "optim.lr=3e-3",
            "optim.warmup_steps=2",
            "optim.decay_steps=12",
            "deepspeed.zero_stage=2",
            "deepspeed.precision=bf16",
            "deepspeed.gradient_clipping=1.0",
            "checkpoint.every=2",
            "checkpoint.keep=2",
            "eval.every=0",
            "eval.batches=1",
            "scale.workers=2",
            *TINY_MODEL,
            "model.tick_checkpointing=2",
            *extra,
        ],
    )


def _losses(tb_dir) -> dict[int, float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tb_dir), size_guidance={"scalars": 0, "histograms": 0})
    acc.Reload()
    return {e.step: e.value for e in acc.Scalars("train/loss")}, acc


def test_checkpoints_restarts_and_relaunches_keep_one_trajectory(
    ray_session, object_store, s3_bucket, demo_data, tmp_path
):
    storage = f"s3://{s3_bucket}/runs"
    # 1. The reference: 12 uninterrupted steps, committed once at the end (so the runs below also
    #    show that saving checkpoints leaves the trajectory alone).
    reference = _config(tmp_path, storage, demo_data, "full", 12, "checkpoint.every=12")
    full = train(reference, interactive=False)
    assert full["step"] == 12 and full["resumed_from"] is None
    full_losses, acc = _losses(run_paths(reference)["tensorboard"])
    assert sorted(full_losses) == list(range(1, 13))

    # 2. The same run stopped at step 9 (a worker killed mid-run is the chaos suite's
    #    test_chaos_worker_death, bitwise against its own reference).
    cfg = _config(tmp_path, storage, demo_data, "split", 9)
    workers = run_paths(cfg)["workers"]
    run = Location.parse(f"{storage}/split", **_store_args(object_store))
    first = train(cfg, interactive=False)
    assert first["step"] == 9 and first["resumed_from"] is None, first

    # 3. Relaunch under the same name to 12 steps: resumes from the step-9 commit.
    out = io.StringIO()
    relaunched = train(
        _config(tmp_path, storage, demo_data, "split", 12), interactive=False, stream=out
    )
    assert relaunched["resumed_from"] == 9 and relaunched["step"] == 12
    assert "resuming from checkpoint at step 9" in out.getvalue()
    assert committed_steps(run.child("checkpoints")) == [10, 12]  # keep=2: older ones were pruned

    # Model, optimizer, schedule, data position and RNG all came back: the losses are the reference's.
    split_losses, _ = _losses(cfg_tb := run_paths(cfg)["tensorboard"])
    assert sorted(split_losses) == list(range(1, 13)), (
        cfg_tb
    )  # replayed steps were purged, none duplicated
    for step in range(1, 13):
        assert split_losses[step] == full_losses[step], (step, split_losses, full_losses)
    assert len(set(full_losses.values())) > 6  # the weights did change from step to step
    with environ(object_store.env()):
        assert Location.parse(f"{storage}/split").child("tensorboard").list(), (
            "TensorBoard events not synced"
        )

    # 4. A relaunch of the finished run returns at once, starting no worker.
    rank0 = open(os.path.join(workers, "rank-0.json")).read()
    done = train(_config(tmp_path, storage, demo_data, "split", 12), interactive=False)
    assert done["already_complete"] and done["step"] == 12
    assert open(os.path.join(workers, "rank-0.json")).read() == rank0
    with environ(object_store.env()):
        saved = Location.parse(f"{storage}/split").read_bytes("config.yaml").decode()
    assert (
        "name: split" in saved and "max_steps: 12" in saved and object_store.secret_key not in saved
    )

    tags = acc.Tags()
    assert "config/text_summary" in tags["tensors"]  # the resolved config, as text
    for tag in (
        "train/accuracy",
        "train/lr",
        "train/grad_norm",
        "perf/samples_per_s",
        "perf/step_time_s",
        "perf/data_wait_s",
        "perf/peak_memory_gib",
        "eval/loss",
        "checkpoint/save_s",
        "eval/top1",
        "eval/top5",
        "train/per_tick_accuracy/tick_001",
        "train/most_certain_tick_mean",
    ):
        assert tag in tags["scalars"], tag
    assert "train/most_certain_tick" in tags["histograms"]
    lrs = {e.step: e.value for e in acc.Scalars("train/lr")}
    assert lrs[2] > lrs[1] and lrs[12] < lrs[3]  # warmup, then cosine decay


def _store_args(store):
    return {"endpoint_url": store.endpoint_url, "key": store.access_key, "secret": store.secret_key}
