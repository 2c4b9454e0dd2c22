"""Whole runs through a store outage and through a change of worker count.

* Store outage: the object store is stopped for ~10 s in the middle of training (checkpoint
  writes and reads retry with backoff); the run finishes with the reference run's exact weights.
* Elastic restart: a checkpoint committed by 2 workers is resumed by 1 worker; the data position
  is mapped so that every sample of the epoch is read exactly once (no skip, no repeat).
"""

from __future__ import annotations

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

    def on_step(step):
        if "outage" not in state and step >= strike:
            state["step"] = step
            state["outage"] = H.Outage(chaos_store, OUTAGE_S).start()

    stream.callbacks.append(on_step)
    try:
        summary = R.run_in_process(cfg, stream)
    finally:
        if "outage" in state:
            state["outage"].join()  # the store is back for the next scenarios whatever happened
    outage = state.get("outage")
    assert outage is not None, f"the run ended before step {strike}"
    # (a restart after the final commit is a Ray teardown hiccup under load, not the outage's doing)
    assert summary["step"] == STEPS and summary.get("resumed_from") in (None, 0, STEPS), (
        f"the run restarted from step {summary.get('resumed_from')}: the outage was not ridden out"
    )
    after = stream.first_step_after(outage.up_at)
    assert H.committed_steps(loc) == list(range(2, STEPS + 1, 2)), (
        "every periodic checkpoint is committed"
    )
    diffs = R.bitwise_differences(R.checkpoint_tensors(loc, STEPS), reference_run["final"])
    assert not diffs, f"{len(diffs)} tensors differ from the uninterrupted run, e.g. {diffs[:5]}"
    rec.trial(
        True,
        steps_lost=0,
        recover_s=(after[0] - outage.up_at) if after else None,
        note=f"store down at step {state['step']}",
    )


def _positions(run_loc, step: int) -> dict[str, int]:
    """The merged data position (samples read per shard) saved with checkpoint ``step``."""
    folder = run_loc.child("checkpoints").child(f"step-{step:09d}")
    extra = R.load_weights_only(folder.read_bytes("extra-rank-00000.pt"))
    return {k: int(v) for k, v in extra["state"]["data"]["positions"].items()}


@pytest.mark.timeout(600)  # the first test to use reference_run also pays for it
def test_elastic_resume_with_another_worker_count_reads_each_sample_once(
    reference_run, run_bucket, demo_data, run_location, tmp_path, rng, scenario
):
    rec = scenario("elastic restart 2 -> 1 workers")
    ref_loc = reference_run["location"]
    step = rng.choice([s for s in reference_run["committed"] if s < STEPS - 1])
    name = "elastic"
    loc = run_location(name)
    # The run "elastic" was checkpointed by 2 workers at `step`: its committed files are the reference's.
    src = ref_loc.child("checkpoints").child(f"step-{step:09d}")
    dst = loc.child("checkpoints").child(f"step-{step:09d}")
    names = [n for n in src.list() if n != "COMMIT"]
    for n in names + ["COMMIT"]:  # COMMIT last, as the checkpointer does
        dst.write_bytes(n, src.read_bytes(n))
    cfg = R.tiny_config(
        name=name,
        storage=f"s3://{run_bucket}/runs",
        data=demo_data,
        local_dir=tmp_path,
        steps=STEPS,
        workers=1,
    )
    stream = H.StepStream()
    t0 = time.monotonic()
    summary = R.run_in_process(cfg, stream)
    assert summary["step"] == STEPS and summary.get("resumed_from") in (step, STEPS), summary
    assert stream.resumes and stream.resumes[0][1] == step

    # Data position: what 2 workers had read at `step`, plus what 1 worker read after, is exactly
    # STEPS global batches; no shard was re-read from an earlier position.
    before, after = _positions(ref_loc, step), _positions(loc, STEPS)
    batch = cfg.data.batch_size
    assert sum(before.values()) == step * batch, before
    assert sum(after.values()) == STEPS * batch, f"{after}: expected {STEPS * batch} samples read"
    assert all(after.get(s, 0) >= p for s, p in before.items()), (
        f"a shard was rewound: {before} -> {after}"
    )
    first = stream.first_step_after(stream.resumes[0][0], above=step)
    rec.trial(
        True,
        steps_lost=0,
        recover_s=(first[0] - t0) if first else None,
        note=f"from step {step}; {sum(after.values())} samples read once",
    )
