"""Whole runs through a store outage and through a change of worker count.

* Store outage: the object store is stopped for ~10 s in the middle of training, with the
  workers frozen until it is down (checkpoint writes and reads retry with backoff; the requests
  attempted meanwhile are recorded); the run finishes with the reference run's exact weights.
* Elastic restart, 2 -> 1 -> 2 ranks of the real loop on a gloo group (no Ray: the resize is the
  loop's and the checkpointer's business): the restored engine state equals the saved one, and
  every sample of the epoch is read exactly once across the changes (no skip, no repeat).
"""

from __future__ import annotations

import threading
import time

import chaos_harness as H
import chaos_runs as R
import pytest
from chaos_runs import STEPS

OUTAGE_S = 10.0


@pytest.mark.timeout(600)  # the first test to use reference_run also pays for it
def test_store_outage_during_training_is_ridden_out(
    reference_run, chaos_store, run_bucket, demo_data, run_location, tmp_path, rng, scenario
):
    """The workers are frozen at a random step, the store goes down, the workers go on: the next
    checkpoint needs the store, so the run meets the outage however fast the machine is, and the
    requests the workers attempted while it was down are recorded on its port."""
    rec = scenario("store outage 10s during training")
    name = "outage"
    loc = run_location(name)
    cfg = R.tiny_config(
        name=name,
        storage=f"s3://{run_bucket}/runs",
        data=demo_data,
        local_dir=tmp_path,
        steps=STEPS,
    )
    strike = rng.randint(2, STEPS // 2)
    stream = H.StepStream()
    state: dict = {}

    def strike_at_step() -> None:
        try:
            with H.hold_at_step(tmp_path, name, strike, cfg.scale.workers, 0.0, set()) as held:
                state["step"] = held.step
                state["outage"] = H.Outage(
                    chaos_store, OUTAGE_S, until=f"/runs/{name}/checkpoints/step-"
                ).start()
                H.wait_until(lambda: state["outage"].stopped_at, 60, what="the store to stop")
        except BaseException as e:  # re-raised by the test once the run has ended
            state["error"] = e

    striker = threading.Thread(target=strike_at_step, daemon=True, name="striker")
    striker.start()
    try:
        summary = R.run_in_process(cfg, stream)
    finally:
        striker.join(60)
        if "outage" in state:
            state["outage"].join()  # the store is back for the next scenarios whatever happened
    if "error" in state:
        raise state["error"]
    outage = state["outage"]
    assert state["step"] < STEPS, f"the workers were held at step {state['step']}, the run's last"
    # (a restart after the final commit is a Ray teardown hiccup under load, not the outage's doing)
    assert summary["step"] == STEPS and summary.get("resumed_from") in (None, 0, STEPS), (
        f"the run restarted from step {summary.get('resumed_from')}: the outage was not ridden out"
    )
    writes = outage.attempted(containing=f"/runs/{name}/checkpoints/step-")
    assert writes, (
        f"no checkpoint request reached the store's port while it was down: {outage.requests}"
    )
    after = stream.first_step_after(outage.up_at)
    assert H.committed_steps(loc) == list(range(2, STEPS + 1, 2)), (
        "every periodic checkpoint is committed"
    )
    diffs = R.bitwise_differences(R.checkpoint_tensors(loc, STEPS), reference_run["final"])
    assert not diffs, f"{len(diffs)} tensors differ from the uninterrupted run, e.g. {diffs[:5]}"
    reached = H.steps_reached_per_attempt(tmp_path, name)
    rec.trial(
        True,
        steps_lost=reached[0] - (summary.get("resumed_from") or reached[0]),
        recover_s=(after[0] - outage.up_at) if after else None,
        note=f"store down at step {state['step']}; {len(writes)} checkpoint requests attempted",
    )


@pytest.fixture(scope="module")
def small_demo_data(chaos_store, run_bucket) -> str:
    """48 demo training samples in 4 shards of 12 (and 16 validation samples): one epoch is 6
    steps of the tiny config's global batch of 8, so a few steps cross a whole epoch."""
    from ctm_dist.data.demo_writer import IMAGE_SIZE, demo_samples
    from ctm_dist.data.writer import write_shard_set
    from ctm_dist.storage import Location

    loc = Location.parse(
        f"s3://{run_bucket}/data-small",
        endpoint_url=chaos_store.endpoint_url,
        key=chaos_store.access_key,
        secret=chaos_store.secret_key,
    )
    samples = demo_samples(0)
    meta = {"num_classes": 10, "classes": [str(d) for d in range(10)], "image_size": IMAGE_SIZE}
    for split, n, per_shard in (("train", EPOCH_SAMPLES, 12), ("val", 16, 16)):
        write_shard_set(
            loc,
            split,
            "demo",
            samples[split][:n],
            samples_per_shard=per_shard,
            meta=meta,
            progress=False,
        )
    return loc.url


EPOCH_SAMPLES = 48


def _assert_same_state(saved: dict, restored: dict, label: str) -> None:
    """Bitwise equality of two ``trainer_child.engine_state`` dumps."""
    for part in ("module", "fp32", "exp_avg", "exp_avg_sq"):
        diffs = R.bitwise_differences(saved[part], restored[part])
        assert not diffs, f"{label}: {part} differs for {diffs[:5]}"
    for key in ("adam_step", "lr_scheduler", "global_steps", "global_samples"):
        assert saved[key] == restored[key], f"{label}: {key} {saved[key]} != {restored[key]}"


@pytest.mark.timeout(600)
def test_elastic_2_to_1_to_2_restores_the_saved_state_and_reads_each_sample_once(
    chaos_store, small_demo_data, run_bucket, tmp_path, scenario
):
    """2 ranks train steps 1-2, 1 rank resumes for steps 3-4, 2 ranks again for 5-6 (the end of the
    epoch), each launch of the real loop on a gloo group. After each change of worker count the
    engine holds exactly what was saved (module weights, fp32 master weights, Adam moments and
    step, lr schedule, step counters: re-partitioned through DeepSpeed's universal checkpoint), and
    the epoch's 48 samples were each read exactly once across the three launches."""
    import torch

    name = "elastic"
    env = chaos_store.env()
    run = dict(
        name=name,
        storage=f"s3://{run_bucket}/runs",
        data=small_demo_data,
        local_dir=str(tmp_path),
        steps=STEPS,
    )

    def launch(label: str, workers: int, resumed: int | None, stop_after: int) -> R.Ranks:
        spec = {
            "run": run,
            "job": name,
            "out": str(tmp_path),
            "dump_restored": resumed is not None,
            "dump_saved": [stop_after],
            "stop_after": stop_after,
        }
        t0 = time.monotonic()
        ranks = R.Ranks(spec, workers, env, tmp_path, label)
        for rank in range(workers):
            assert ranks.wait_event("started", rank=rank)["resumed_from"] == resumed
        ranks.launched_at = t0
        assert ranks.wait() == [0] * workers, ranks.stderr_tail()
        return ranks

    def state(path):
        return torch.load(tmp_path / path, weights_only=True)

    launches = [launch("elastic-2", 2, None, 2)]
    for label, workers, resumed, saved_by, stop_after in (
        ("2 -> 1", 1, 2, 2, 4),
        ("1 -> 2", 2, 4, 1, 6),
    ):
        rec = scenario(f"elastic restart {label} workers")
        ranks = launch(f"elastic-{workers}-from-{resumed}", workers, resumed, stop_after)
        launches.append(ranks)
        _assert_same_state(state(f"saved-{resumed}.pt"), state(f"restored-{workers}.pt"), label)
        first = ranks.wait_event("keys", rank=0)
        rec.trial(
            True,
            steps_lost=resumed - (first["step"] - 1),
            recover_s=first["t"] - ranks.launched_at,
            note=f"{saved_by} -> {workers} ranks at step {resumed}: weights, Adam state equal",
        )

    # Which samples were read: every step of the epoch, from whichever launch and rank ran it.
    read: dict[int, list[str]] = {}
    for ranks in launches:
        for e in ranks.of("keys"):
            read.setdefault(e["step"], []).extend(k for k, valid in e["keys"] if valid)
    assert sorted(read) == list(range(1, 7)), sorted(read)
    keys = [k for step in sorted(read) for k in read[step]]
    repeated = sorted({k for k in keys if keys.count(k) > 1})
    assert not repeated, f"samples read twice across the worker-count changes: {repeated}"
    assert len(set(keys)) == EPOCH_SAMPLES, (
        f"{EPOCH_SAMPLES - len(set(keys))} samples of the epoch were never read"
    )
