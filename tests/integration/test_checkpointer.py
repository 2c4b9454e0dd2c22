"""Checkpointer on a real DeepSpeed engine (CPU, bf16) and a real local S3 server with keys enforced."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest
import torch
from checkpoint_fixtures import (
    MODEL_CONFIG,
    elastic_worker,
    free_port,
    full_params,
    init_dist,
    make_engine,
    train_step,
)

from ctm_dist.storage import Location
from ctm_dist.train import rng
from ctm_dist.train.checkpointer import (
    COMMIT,
    Checkpointer,
    CheckpointError,
    ConfigMismatch,
    NoCheckpoint,
    NotACheckpoint,
    RunLocked,
    UnsafeCheckpoint,
    step_name,
)
from ctm_dist.train.lease import LEASE

HERE = Path(__file__).resolve().parent


@pytest.fixture(scope="module", autouse=True)
def single_rank_group():
    init_dist()


@pytest.fixture
def run(s3_location) -> Location:
    return s3_location.child("run")


def assert_params_equal(a: dict, b: dict):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def optimizer_moments(engine) -> list[torch.Tensor]:
    """Adam's exp_avg/exp_avg_sq of this rank's (fp32 master) partition, in a stable order."""
    opt = engine.optimizer
    inner = getattr(opt, "optimizer", opt)
    return [st[k].clone() for st in inner.state.values() for k in ("exp_avg", "exp_avg_sq")]


@pytest.mark.parametrize("stage", [0, 2, 3])
def test_round_trip_gives_identical_state_and_next_step(run, stage):
    engine = make_engine(stage, seed=0)
    for step in (1, 2, 3):
        train_step(engine, step)
    ckpt = Checkpointer(run, rank=0, world_size=1)
    torch.manual_seed(1234)
    saved_rng = rng.capture()
    expected_draw = torch.rand(3)
    commit = ckpt.save(
        3, engine, {"position": torch.tensor([7, 3]), "rng": saved_rng, "epoch": 1}, MODEL_CONFIG
    )
    assert commit["step"] == 3 and commit["zero_stage"] == stage and commit["world_size"] == 1
    saved_params, saved_moments = full_params(engine), optimizer_moments(engine)
    saved_lr = engine.lr_scheduler.get_last_lr()
    next_loss = train_step(engine, 4)
    next_params = full_params(engine)

    fresh = make_engine(stage, seed=99)  # other initial weights, empty optimizer
    assert not torch.equal(full_params(fresh)["0.weight"], saved_params["0.weight"])
    extra = Checkpointer(run).load(fresh, config=MODEL_CONFIG)
    assert_params_equal(full_params(fresh), saved_params)
    moments = optimizer_moments(fresh)
    assert len(moments) == len(saved_moments) > 0
    assert all(torch.equal(a, b) for a, b in zip(moments, saved_moments))
    assert fresh.lr_scheduler.get_last_lr() == saved_lr
    assert fresh.global_steps == engine.global_steps - 1
    assert torch.equal(extra["position"], torch.tensor([7, 3])) and extra["epoch"] == 1
    rng.restore(extra["rng"])
    assert torch.equal(torch.rand(3), expected_draw)
    assert train_step(fresh, 4) == next_loss
    assert_params_equal(full_params(fresh), next_params)


def test_commit_marker_keep_last_and_no_secrets(run, object_store):
    engine = make_engine(0)
    ckpt = Checkpointer(run, keep_last=2)
    assert ckpt.latest_committed() is None
    with pytest.raises(NoCheckpoint, match="no committed checkpoint"):
        ckpt.load(engine)
    assert ckpt.load_latest(engine) is None
    config = dict(
        MODEL_CONFIG,
        storage={
            "url": run.url,
            "secret_key": object_store.secret_key,
            "note": f"copied from a shell: {object_store.secret_key}",
        },
    )
    for step in (1, 2, 3):
        train_step(engine, step)
        ckpt.save(step, engine, {"position": torch.tensor(step)}, config)
    assert ckpt.committed_steps() == [2, 3]
    assert run.child("checkpoints").list() == [
        LEASE,
        step_name(2),
        step_name(3),
    ]  # LEASE: this job writes the run
    raw = run.read_bytes(f"checkpoints/{step_name(3)}/{COMMIT}")
    commit = json.loads(raw)
    assert commit["files"] == {n: s for n, s in ckpt._sizes(step_name(3)).items() if n != COMMIT}
    assert (
        "extra-rank-00000.pt" in commit["files"] and "mp_rank_00_model_states.pt" in commit["files"]
    )
    assert commit["config"]["model"] == MODEL_CONFIG["model"]
    for name in run.child(f"checkpoints/{step_name(3)}").list():
        blob = run.read_bytes(f"checkpoints/{step_name(3)}/{name}")
        assert (
            object_store.secret_key.encode() not in blob
            and object_store.access_key.encode() not in blob
        )
    step, extra = ckpt.load_latest(make_engine(0, seed=5))
    assert step == 3 and int(extra["position"]) == 3
    # A commit whose file went missing is not a checkpoint any more; the previous one is used.
    run.rm(f"checkpoints/{step_name(3)}/extra-rank-00000.pt")
    assert ckpt.latest_committed() == 2
    ckpt.close()
    assert LEASE not in run.child("checkpoints").list()


def test_refuses_other_config_foreign_file_and_code_pickle(run, tmp_path):
    engine = make_engine(0)
    train_step(engine, 1)
    ckpt = Checkpointer(run)
    ckpt.save(1, engine, {"position": torch.tensor(1)}, MODEL_CONFIG)
    other = {"model": dict(MODEL_CONFIG["model"], d_hidden=32)}
    with pytest.raises(ConfigMismatch, match="d_hidden: 16 .* != 32"):
        ckpt.load(engine, config=other)

    name = step_name(1)
    commit = json.loads(run.read_bytes(f"checkpoints/{name}/{COMMIT}"))

    def replace_file(fname: str, data: bytes):
        run.write_bytes(f"checkpoints/{name}/{fname}", data)
        commit["files"][fname] = len(data)  # an attacker also fixes the sizes and checksums
        commit["sha256"][fname] = hashlib.sha256(data).hexdigest()
        run.write_bytes(f"checkpoints/{name}/{COMMIT}", json.dumps(commit).encode())

    good = run.read_bytes(f"checkpoints/{name}/mp_rank_00_model_states.pt")
    replace_file("mp_rank_00_model_states.pt", b"this is a text file, not a checkpoint\n" * 10)
    with pytest.raises(NotACheckpoint, match="mp_rank_00_model_states.pt: not a torch checkpoint"):
        ckpt.load(engine)
    replace_file("mp_rank_00_model_states.pt", good)

    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    evil = tmp_path / "evil.pt"
    torch.save({"format": "ctm-dist-checkpoint/1", "state": Evil()}, evil)
    replace_file("extra-rank-00000.pt", evil.read_bytes())
    with pytest.raises(UnsafeCheckpoint, match="refused to unpickle.*nothing was executed"):
        ckpt.load(engine)
    assert not marker.exists()

    run.write_bytes(f"checkpoints/{name}/{COMMIT}", b"not json")
    with pytest.raises(NotACheckpoint, match="not a ctm-dist commit marker"):
        ckpt.read_commit(1)
    assert ckpt.latest_committed() is None


def _outage(store, seconds: float) -> threading.Thread:
    def run():
        ports = dict(store.ports)
        store.stop()
        store.ports = ports
        time.sleep(seconds)
        store.restart()

    t = threading.Thread(target=run, daemon=True)
    t.start()
    time.sleep(0.3)  # the server is going down
    return t


def test_store_outage_clear_error_beyond_deadline_and_retries_within(run, object_store):
    engine = make_engine(0)
    train_step(engine, 1)
    Checkpointer(run).save(1, engine, {"position": torch.tensor(1)}, MODEL_CONFIG)
    params_1 = full_params(engine)
    train_step(engine, 2)

    outage = _outage(object_store, 6.0)  # weed mini stopped, restarted on the same ports 6 s later
    try:
        start = time.monotonic()
        with pytest.raises(
            CheckpointError,
            match="nothing was committed.*previous committed checkpoint stays valid",
        ):
            Checkpointer(run, retry_deadline=1.5).save(
                2, engine, {"position": torch.tensor(2)}, MODEL_CONFIG
            )
        assert time.monotonic() - start < 30
        Checkpointer(run, retry_deadline=60).save(
            2, engine, {"position": torch.tensor(2)}, MODEL_CONFIG
        )
        assert time.monotonic() - start > 5  # it really waited for the store to come back
    finally:
        outage.join(60)
    ckpt = Checkpointer(run)
    assert ckpt.committed_steps() == [1, 2]
    fresh = make_engine(0, seed=3)
    assert (
        int(ckpt.load(fresh, step=1)["position"]) == 1
    )  # the commit from before the outage still loads
    assert_params_equal(full_params(fresh), params_1)
    assert int(ckpt.load(fresh)["position"]) == 2


def test_two_ranks_killed_mid_upload_then_resume_on_one_rank(run, object_store, tmp_path):
    """2-rank ZeRO-2 group commits step 2 and is SIGKILLed while uploading step 3: step 3 is never
    picked, step 2 resumes on ONE rank with equal weights, and a later save removes step 3's debris."""
    import torch.multiprocessing as mp

    params_out = tmp_path / "params.pt"
    ctx = mp.get_context("spawn")
    port = free_port()
    procs = [
        ctx.Process(
            target=elastic_worker,
            daemon=True,
            args=(
                r,
                2,
                port,
                f"s3://{run.path}",
                object_store.env(),
                str(params_out),
                str(tmp_path / f"rank{r}"),
            ),
        )
        for r in range(2)
    ]
    for p in procs:
        p.start()
    step3 = run.child(f"checkpoints/{step_name(3)}")
    try:
        deadline = time.monotonic() + 240
        while not (step3.exists() and len(step3.list()) >= 2):
            assert all(p.is_alive() for p in procs), "a rank died before uploading step 3"
            assert time.monotonic() < deadline, "step 3 upload never started"
            time.sleep(0.2)
    finally:
        for p in procs:
            if p.pid and p.is_alive():
                os.kill(p.pid, signal.SIGKILL)
            p.join(30)
    assert COMMIT not in step3.list()

    ckpt = Checkpointer(run, rank=0, world_size=1)
    assert ckpt.committed_steps() == [2]
    commit = ckpt.read_commit(2)
    assert commit["world_size"] == 2 and {"extra-rank-00000.pt", "extra-rank-00001.pt"} <= set(
        commit["files"]
    )
    engine = make_engine(2, seed=11)
    with pytest.raises(CheckpointError, match=r"saved by 2 ranks \(ZeRO stage 2\).*all_ranks=True"):
        ckpt.load(engine)
    states = ckpt.load(engine, all_ranks=True)
    assert [int(s["position"]) for s in states] == [100, 101]
    assert_params_equal(full_params(engine), torch.load(params_out, weights_only=True))
    assert torch.isfinite(torch.tensor(train_step(engine, 3)))
    ckpt.save(4, engine, {"position": torch.tensor(4)}, MODEL_CONFIG)
    # step 3's debris is gone; the killed group's lease was taken over once its heartbeat stopped
    assert run.child("checkpoints").list() == [LEASE, step_name(2), step_name(4)]
    assert int(Checkpointer(run).load(make_engine(2, seed=12))["position"]) == 4


def test_rng_state_is_plain_data_and_restores_every_generator(tmp_path):
    import random

    import numpy as np

    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    np.random.randn()  # leaves a cached gaussian in numpy's state
    state = rng.capture()
    expected = (random.random(), np.random.randn(3).tolist(), torch.rand(3))
    torch.save(state, tmp_path / "rng.pt")
    loaded = torch.load(tmp_path / "rng.pt", weights_only=True)
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    rng.restore(loaded)
    got = (random.random(), np.random.randn(3).tolist(), torch.rand(3))
    assert got[0] == expected[0] and got[1] == expected[1] and torch.equal(got[2], expected[2])


def _zero_inside_largest_tensor(data: bytes, nbytes: int = 4096) -> bytes:
    """``data`` (a torch.save zip) with up to ``nbytes`` zeroed inside its largest tensor record: same
    size, still a valid archive, other weights."""
    import io
    import struct
    import zipfile

    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        info = max((i for i in zf.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    name_len, extra_len = struct.unpack(
        "<HH", data[info.header_offset + 26 : info.header_offset + 30]
    )
    start = info.header_offset + 30 + name_len + extra_len
    n = min(nbytes, info.file_size)
    assert any(data[start : start + n]), "the record is already zero"
    return data[:start] + bytes(n) + data[start + n :]


def test_damaged_newest_step_is_unusable_resume_falls_back_and_prune_keeps_it(run, caplog):
    """Bytes zeroed inside a committed tensor file (same size) make that step unusable (SHA-256 in
    COMMIT); resume falls back to the previous step and says so; keep_last=1 pruning keeps it."""
    engine = make_engine(0)
    writer = Checkpointer(run, keep_last=2)
    train_step(engine, 1)
    writer.save(1, engine, {"position": torch.tensor(1)}, MODEL_CONFIG)
    params_1 = full_params(engine)
    train_step(engine, 2)
    writer.save(2, engine, {"position": torch.tensor(2)}, MODEL_CONFIG)
    writer.close()
    model_file = f"checkpoints/{step_name(2)}/mp_rank_00_model_states.pt"
    good = run.read_bytes(model_file)
    run.write_bytes(model_file, _zero_inside_largest_tensor(good))

    ckpt = Checkpointer(run, keep_last=1)
    assert ckpt.committed_steps() == [1, 2]  # sizes still match: only the checksum tells
    with pytest.raises(NotACheckpoint, match="mp_rank_00_model_states.pt: its SHA-256 differs"):
        ckpt.load(make_engine(0, seed=4), step=2)
    fresh = make_engine(0, seed=5)
    with caplog.at_level("WARNING", logger="ctm_dist.train.checkpointer"):
        step, extra = ckpt.load_latest(fresh, config=MODEL_CONFIG)
    assert step == 1 and int(extra["position"]) == 1
    assert_params_equal(full_params(fresh), params_1)
    assert "falling back to the previous committed step step-000000001" in caplog.text
    assert ckpt.prune() == [] and ckpt.committed_steps() == [1, 2]  # the step that verified stays

    # The resumed run reaches step 2 again: its save replaces the damaged commit, then prunes step 1.
    train_step(fresh, 2)
    ckpt.save(2, fresh, {"position": torch.tensor(22)}, MODEL_CONFIG)
    assert ckpt.committed_steps() == [2]
    assert int(Checkpointer(run).load(make_engine(0, seed=6), step=2)["position"]) == 22
    ckpt.close()


def test_one_writer_per_run_lease_refuses_a_second_job_and_commit_lists_only_its_files(
    run, monkeypatch
):
    """A second job on the same run is refused while the first one's heartbeat runs; a file another
    job drops into the step directory during a save is not part of the COMMIT; after release the
    second job starts at once."""
    from ctm_dist.storage import Location as Loc

    engine = make_engine(0)
    train_step(engine, 1)
    first = Checkpointer(run, owner="job-a", lease_ttl=1.5)
    first.acquire()
    second = Checkpointer(run, owner="job-b", lease_ttl=1.5)
    start = time.monotonic()
    with pytest.raises(
        RunLocked, match="being written by another job .*owner job-a.*choose another run name"
    ):
        second.save(1, engine, {"position": torch.tensor(1)}, MODEL_CONFIG)
    assert (
        time.monotonic() - start < 10
    )  # refused (a silent holder would have been taken over instead)
    assert Checkpointer(run).committed_steps() == []

    stray = "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    real_put = Loc.put_file

    def put_and_interleave(self, local_path, name):
        real_put(self, local_path, name)
        if name.endswith(
            "extra-rank-00000.pt"
        ):  # the other job's rank uploads into the same directory
            self.write_bytes(name.rsplit("/", 1)[0] + "/" + stray, b"another trajectory")

    monkeypatch.setattr(Loc, "put_file", put_and_interleave)
    commit = first.save(1, engine, {"position": torch.tensor(1)}, MODEL_CONFIG)
    monkeypatch.undo()
    assert stray in run.child(f"checkpoints/{step_name(1)}").list()
    assert stray not in commit["files"] and set(commit["files"]) == set(commit["sha256"])
    assert set(commit["files"]) == {"mp_rank_00_model_states.pt", "extra-rank-00000.pt"}

    first.close()
    start = time.monotonic()
    second.acquire()  # released: taken at once (the first read finds no lease)
    assert time.monotonic() - start < 5
    with pytest.raises(RunLocked, match="owner job-b"):
        first.acquire()  # now job-a is the second job
    second.close()


def test_lease_of_a_killed_job_is_taken_over_after_its_ttl(run, object_store):
    """A job SIGKILLed while holding the lease (no release) blocks a rerun only until its ttl."""
    import subprocess
    import sys

    code = (
        "import os, signal; from ctm_dist.train.checkpointer import Checkpointer; "
        f"c = Checkpointer({f's3://{run.path}'!r}, owner='crashed-job', lease_ttl=2.0); c.acquire(); "
        "print('held', flush=True); os.kill(os.getpid(), signal.SIGKILL)"
    )
    env = dict(os.environ, **object_store.env(), PYTHONPATH=str(HERE.parents[1]))
    proc = subprocess.run(
        [sys.executable, "-c", code],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == -signal.SIGKILL and "held" in proc.stdout, proc.stderr[-2000:]
    assert LEASE in run.child("checkpoints").list()
    rerun = Checkpointer(run, owner="rerun", lease_ttl=2.0)
    start = time.monotonic()
    rerun.acquire()
    assert time.monotonic() - start < 6
    assert json.loads(run.read_bytes(f"checkpoints/{LEASE}"))["owner"] == "rerun"
    rerun.close()


def test_paths_in_commit_or_object_keys_are_refused(run, tmp_path, monkeypatch):
    """File names from COMMIT and object keys from a listing are never turned into paths outside the
    download directory, even when the store lists such keys."""
    from ctm_dist.storage import StorageError

    engine = make_engine(0)
    train_step(engine, 1)
    ckpt = Checkpointer(run)
    ckpt.save(1, engine, {"position": torch.tensor(1)}, MODEL_CONFIG)
    ckpt.close()
    name = step_name(1)
    commit = json.loads(run.read_bytes(f"checkpoints/{name}/{COMMIT}"))
    escape = tmp_path / "escaped.pt"
    steps = run.child("checkpoints")
    real_find = type(steps.fs).find

    def permissive_find(fs, path, *args, **kwargs):  # a store that accepts and lists such keys
        found = real_find(fs, path, *args, **kwargs)
        hostile = {path.rstrip("/") + "/../../../escaped.pt": {"size": 5}, str(escape): {"size": 5}}
        if kwargs.get("detail"):
            return {**found, **hostile}
        return sorted(found) + sorted(hostile)

    monkeypatch.setattr(type(steps.fs), "find", permissive_find)
    for hostile in ("../../../escaped.pt", str(escape)):
        forged = dict(
            commit,
            files=dict(commit["files"], **{hostile: 5}),
            sha256=dict(commit["sha256"], **{hostile: "0" * 64}),
        )
        run.write_bytes(f"checkpoints/{name}/{COMMIT}", json.dumps(forged).encode())
        with pytest.raises(UnsafeCheckpoint, match="refused the file name .*plain name"):
            Checkpointer(run).load(make_engine(0, seed=2), step=1)
    with pytest.raises(StorageError, match="refused the object key .*outside"):
        steps.get_dir(name, tmp_path / "copy")
    assert not escape.exists() and not (tmp_path.parent / "escaped.pt").exists()
