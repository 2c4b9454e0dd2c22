"""Chaos-suite fixtures and the summary table printed at the end of the session.

Fixtures: ``chaos_store`` (a private LocalObjectStore the scenarios may stop and restart, so the
session-wide ``object_store`` of the other tests is never disturbed), ``chaos_bucket``,
``chaos_seed`` (the random steps of the kill trials; set ``CHAOS_SEED`` to replay a session) and
``scenario`` (records trials for the table: scenario, trials, passed, steps lost, time to recover).
"""

from __future__ import annotations

import os
import random
import time
import uuid

import chaos_harness as H
import pytest

_SEED = int(os.environ.get("CHAOS_SEED") or random.SystemRandom().randrange(1, 10**6))


@pytest.fixture(scope="session")
def chaos_seed() -> int:
    return _SEED


@pytest.fixture
def rng(chaos_seed, request) -> random.Random:
    """A random generator per test, fixed by CHAOS_SEED and the test's name."""
    return random.Random(f"{chaos_seed}/{request.node.nodeid}")


@pytest.fixture
def scenario(request):
    """``scenario(name)`` -> a record whose ``.trial(passed, steps_lost, recover_s)`` fills the table."""
    made = []

    def make(name: str) -> H.ScenarioRecord:
        rec = H.ScenarioRecord(name, request.node.nodeid)
        H.RECORDS.append(rec)
        made.append(rec)
        return rec

    request.node._chaos_records = made
    return make


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """A test's outcome goes to its scenarios; when it failed, only to the scenario it was in the middle
    of (those without a finished trial), or to all of them if it failed after their trials."""
    outcome = yield
    report = outcome.get_result()
    records = getattr(item, "_chaos_records", None)
    if not records:
        return
    if report.failed or (report.when == "setup" and report.outcome != "passed"):
        unfinished = [r for r in records if not r.trials]
        for r in unfinished or records:
            r.outcome = report.outcome if report.outcome != "passed" else "failed"
        for r in records:
            if r.outcome == "not run":
                r.outcome = "passed"
    elif report.when == "call":
        for r in records:
            if r.outcome == "not run":
                r.outcome = "passed"


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if not H.RECORDS:
        return
    tr = terminalreporter
    tr.section(f"chaos summary (CHAOS_SEED={_SEED})")
    for line in H.format_table(H.summary_rows()):
        tr.write_line(line)


# ---------------------------------------------------------------- storage


@pytest.fixture(scope="session")
def chaos_store(tmp_path_factory):
    """A LocalObjectStore only the chaos scenarios use (they stop and restart it)."""
    from ctm_dist.storage import LocalObjectStore

    # Short path: weed's unix sockets live in the data dir only when its path is short.
    store = LocalObjectStore(tmp_path_factory.mktemp("chaos-s3"))
    store.start()
    try:
        yield store
    finally:
        store.stop()


@pytest.fixture
def chaos_bucket(chaos_store) -> str:
    name = f"chaos-{uuid.uuid4().hex[:10]}"
    H.wait_until(lambda: _try_create(chaos_store, name), 30, what="bucket creation")
    return name


def _try_create(store, name) -> bool:
    try:
        store.create_bucket(name)
        return True
    except Exception:
        time.sleep(0.2)
        return False


@pytest.fixture
def chaos_location(chaos_store, chaos_bucket):
    from ctm_dist.storage import Location

    return Location.parse(
        f"s3://{chaos_bucket}",
        endpoint_url=chaos_store.endpoint_url,
        key=chaos_store.access_key,
        secret=chaos_store.secret_key,
        retry_deadline=30,
    )


@pytest.fixture
def s3_env_for(chaos_store, monkeypatch):
    """``s3_env_for(location)``: point the AWS_* variables (read by the trainer's tasks) at the chaos store."""

    def apply(_location=None) -> dict[str, str]:
        env = chaos_store.env()
        for k, v in env.items():
            monkeypatch.setenv(k, v)
        return env

    return apply


# ---------------------------------------------------------------- whole runs


@pytest.fixture(scope="session")
def ray_session(chaos_store, tmp_path_factory):
    """One local Ray instance for every whole-run scenario (in-process runs and launcher subprocesses
    join it). Its workers inherit the chaos store's AWS_* variables from this process's environment
    (not through a runtime_env, which Ray writes into its logs). Shut down at the end of the session."""
    import ray

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    for k, v in chaos_store.env().items():
        os.environ[k] = v
    if ray.is_initialized():
        ray.shutdown()
    ctx = ray.init(num_cpus=4, include_dashboard=False, configure_logging=False, log_to_driver=True)
    try:
        yield ctx.address_info["gcs_address"]
    finally:
        ray.shutdown()


@pytest.fixture(scope="session")
def run_bucket(chaos_store) -> str:
    """A bucket for whole runs: demo shards under ``data/``, runs under ``runs/``."""
    name = f"chaos-runs-{uuid.uuid4().hex[:8]}"
    chaos_store.create_bucket(name)
    return name


@pytest.fixture(scope="session")
def demo_data(chaos_store, run_bucket) -> str:
    """The demo shard set (train + val) in the chaos store, written once."""
    from ctm_dist.data.demo_writer import write_demo_shards
    from ctm_dist.storage import Location

    loc = Location.parse(
        f"s3://{run_bucket}/data",
        endpoint_url=chaos_store.endpoint_url,
        key=chaos_store.access_key,
        secret=chaos_store.secret_key,
    )
    write_demo_shards(loc)
    return loc.url


@pytest.fixture
def run_location(chaos_store, run_bucket):
    """``run_location(name)``: the Location of a run's folder in the chaos store."""
    from ctm_dist.storage import Location

    def make(name: str):
        return Location.parse(
            f"s3://{run_bucket}/runs/{name}",
            endpoint_url=chaos_store.endpoint_url,
            key=chaos_store.access_key,
            secret=chaos_store.secret_key,
            retry_deadline=30,
        )

    return make


@pytest.fixture(scope="session")
def reference_run(ray_session, demo_data, run_bucket, tmp_path_factory, chaos_store):
    """The uninterrupted run every interrupted one must match bit for bit: 2 workers, STEPS steps,
    a checkpoint every 2 steps. Returns a dict with its summary, committed steps, final tensors."""
    import chaos_runs as R
    from chaos_runs import STEPS

    from ctm_dist.storage import Location

    local = tmp_path_factory.mktemp("ref")
    name = "reference"
    cfg = R.tiny_config(
        name=name, storage=f"s3://{run_bucket}/runs", data=demo_data, local_dir=local, steps=STEPS
    )
    stream = H.StepStream()
    t0 = time.monotonic()
    summary = R.run_in_process(cfg, stream)
    loc = Location.parse(
        f"s3://{run_bucket}/runs/{name}",
        endpoint_url=chaos_store.endpoint_url,
        key=chaos_store.access_key,
        secret=chaos_store.secret_key,
    )
    committed = H.committed_steps(loc)
    return {
        "summary": summary,
        "committed": committed,
        "location": loc,
        "wall_s": time.monotonic() - t0,
        "final": R.checkpoint_tensors(loc, STEPS),
        "stream": stream,
        "config": cfg,
    }
