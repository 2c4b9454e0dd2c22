"""Checkpoints under fire: a process SIGKILLed in the middle of a checkpoint upload, the store going
away during a checkpoint write, and checkpoints that must be refused (another model config, files
that are not checkpoints, a pickle that carries code).

A checkpoint is either complete and loadable or invisible: the partial one is never picked, the
previous commit is resumed, and the debris is removed by a later save.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import chaos_harness as H
import pytest
import torch

CHILD = Path(__file__).with_name("ckpt_child.py")
CLEAR = (
    "CheckpointError",
    "NotACheckpoint",
    "ConfigMismatch",
    "UnsafeCheckpoint",
)  # the checkpointer's errors


class _CodeInPickle:
    """Unpickling this runs a shell command (what a malicious checkpoint would do)."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class _Child:
    """``ckpt_child.py`` with stdout piped (its JSON lines) and stderr in a file (DeepSpeed logs a lot;
    a pipe nobody reads would fill up and block the child)."""

    def __init__(self, args: list[str], env: dict, log_dir: Path):
        full = dict(os.environ)
        full.update(env)
        full["PYTHONUNBUFFERED"] = "1"
        self.log = log_dir / f"child-{args[0]}-{time.monotonic_ns()}.log"
        with open(self.log, "wb") as err:
            self.proc = subprocess.Popen(
                [sys.executable, str(CHILD), *args],
                env=full,
                stdout=subprocess.PIPE,
                stderr=err,
                stdin=subprocess.PIPE,
                text=True,
            )
        self.stdout, self.stdin = self.proc.stdout, self.proc.stdin

    def communicate(self, timeout: float):
        try:
            out, _ = self.proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.communicate()
            raise
        return out, self.stderr()

    def stderr(self) -> str:
        return self.log.read_text(errors="replace")

    @property
    def returncode(self):
        return self.proc.returncode


def _json_lines(text: str) -> list[dict]:
    out = []
    for line in text.splitlines():
        if line.startswith("{"):
            out.append(json.loads(line))
    return out


def _checkpointer(url: str):
    from ctm_dist.storage import Location
    from ctm_dist.train.checkpointer import Checkpointer

    return Checkpointer(Location.parse(url), keep_last=5)


@pytest.fixture(scope="module")
def crashed_run(chaos_store, run_bucket, chaos_seed, tmp_path_factory):
    """A one-rank run that committed step 2, then was SIGKILLed right after the n-th file of step 4
    reached the store (n random in 1..3; 3 = every file, only COMMIT missing)."""
    import random

    from ctm_dist.storage import Location

    after = random.Random(f"{chaos_seed}/crash").randint(1, 3)
    url = f"s3://{run_bucket}/runs/ckpt-crash"
    child = _Child(
        ["crash-upload", url, "4", str(after)], chaos_store.env(), tmp_path_factory.mktemp("crash")
    )
    out, err = child.communicate(timeout=240)
    loc = Location.parse(
        url,
        endpoint_url=chaos_store.endpoint_url,
        key=chaos_store.access_key,
        secret=chaos_store.secret_key,
    )
    return {
        "url": url,
        "location": loc,
        "after": after,
        "rc": child.returncode,
        "out": out,
        "err": err,
    }


@pytest.mark.timeout(400)
def test_crash_mid_upload_then_store_outage_during_checkpoint_writes(
    chaos_store, crashed_run, s3_env_for, tmp_path, scenario
):
    env = s3_env_for()
    run_url, loc, after = crashed_run["url"], crashed_run["location"], crashed_run["after"]

    # 1. The partial step 4 is in the store but invisible; step 2 is the newest commit.
    rec = scenario("crash mid checkpoint upload")
    assert crashed_run["rc"] == -9, (
        f"the child should have died by SIGKILL: rc={crashed_run['rc']}\n"
        f"{crashed_run['err'][-3000:]}"
    )
    lines = _json_lines(crashed_run["out"])
    assert lines[0]["committed"] == [2] and "killing_after" in lines[-1], crashed_run["out"]
    assert "step-000000004" in H.all_checkpoint_dirs(loc), (
        "the partial checkpoint should be in the store"
    )
    assert H.committed_steps(loc) == [2], "the partial checkpoint must not look committed"
    ck = _checkpointer(run_url)
    assert ck.committed_steps() == [2] and ck.latest_committed() == 2

    # 2. Resume (must pick 2, not the partial 4); then the store goes down while step 6 is written.
    child = _Child(["outage", run_url], env, tmp_path)
    seen = []
    while (
        line := child.stdout.readline()
    ) and line.strip() != "READY":  # DeepSpeed prints to stdout too
        seen.append(line)
    assert line.strip() == "READY", "".join(seen)[-2000:] + child.stderr()[-3000:]
    outage = H.Outage(chaos_store, 10.0, until="/runs/ckpt-crash/checkpoints/").start()
    try:
        H.wait_until(lambda: outage.stopped_at, 30, what="the store to stop")
        child.stdin.write("go\n")
        child.stdin.flush()
        out, err = child.communicate(timeout=180)
    finally:
        outage.join()  # the store is back for the next scenarios whatever happened
    assert child.returncode == 0, err[-3000:]
    result = _json_lines(out)[-1]
    assert result["resumed"] == 2 and result["extra_ok"], result
    rec.trial(
        True,
        steps_lost=4 - result["resumed"],
        note=f"killed after {after} file(s) of step 4; resumed from {result['resumed']}",
    )

    rec = scenario("store outage > deadline: checkpoint write")
    assert (
        result["short_deadline"].startswith("CheckpointError")
        or "Storage" in result["short_deadline"]
    ), result
    assert (
        "endpoint unreachable" in result["short_deadline"]
        or "unreachable" in result["short_deadline"]
    ), result
    assert chaos_store.secret_key not in result["short_deadline"]
    assert result["short_failed_at"] < outage.restart_at, (
        f"a 3 s deadline should give up while the store is still down: {result}"
    )
    rec.trial(True, recover_s=result["short_s"], note="clear error, previous commit kept")

    rec = scenario("store outage 10s: checkpoint write")
    assert result["long_deadline"] == "saved", result
    assert result["committed"] == [2, 6], result
    writes = outage.attempted(containing="/runs/ckpt-crash/checkpoints/")
    assert writes, f"the saves reached no request to the store's port: {outage.requests}"
    rec.trial(
        True,
        steps_lost=6 - max(result["committed"]),
        recover_s=max(0.0, result["saved_at"] - outage.up_at),
        note=f"save took {result['long_s']:.1f}s; {len(writes)} requests attempted while down",
    )

    # 3. The debris of the crashed step 4 (older than the newest commit) is gone after the next save.
    assert "step-000000004" not in H.all_checkpoint_dirs(loc)
    assert H.committed_steps(loc) == [2, 6]


@pytest.mark.timeout(300)
def test_checkpoints_that_must_be_refused(
    chaos_store, crashed_run, run_bucket, run_location, tmp_path, s3_env_for, scenario
):
    """Another model config, a file that is not a checkpoint, a foreign torch file and a pickle with
    code, each placed where a committed checkpoint would be: every load fails with a clear
    CheckpointError subclass, and the code in the pickle never runs."""
    from ctm_dist.train.checkpointer import COMMIT

    env = s3_env_for()
    assert crashed_run["rc"] == -9, crashed_run["err"][-3000:]
    src = crashed_run["location"].child("checkpoints").child("step-000000002")
    commit = json.loads(src.read_bytes(COMMIT))
    files = {f: src.read_bytes(f) for f in commit["files"]}
    model_file = next(f for f in files if "model_states" in f)
    extra_file = next(f for f in files if f.startswith("extra-rank-"))

    marker = tmp_path / "code-ran"
    evil = io.BytesIO()
    torch.save({"format": "ctm-dist-checkpoint/1", "state": _CodeInPickle(str(marker))}, evil)
    foreign = io.BytesIO()
    torch.save({"weights": torch.zeros(3)}, foreign)
    forgeries = {
        2: {
            model_file: b"this is not a checkpoint".ljust(len(files[model_file]), b"#")
        },  # same size
        4: {extra_file: evil.getvalue()},
        6: {model_file: foreign.getvalue()},
        8: {model_file: files[model_file][: len(files[model_file]) // 2]},  # truncated
    }
    forged = run_location("ckpt-forged").child("checkpoints")
    for step, replaced in forgeries.items():
        d = forged.child(f"step-{step:09d}")
        content = dict(files, **replaced)
        for f, data in content.items():
            d.write_bytes(f, data)
        d.write_bytes(
            COMMIT,
            json.dumps(
                dict(
                    commit,
                    step=step,
                    files={f: len(b) for f, b in content.items()},
                    sha256={
                        f: hashlib.sha256(b).hexdigest()  # forged to match too
                        for f, b in content.items()
                    },
                )
            ).encode(),
        )

    # A run whose newest commit has 4 KB zeroed inside a file (same size, COMMIT untouched): a damaged disk
    # or a bad copy, not a forgery. Step 2 is the good copy.
    damaged = run_location("ckpt-damaged").child("checkpoints")
    middle = len(files[model_file]) // 2
    for step, content in (
        (2, files),
        (
            4,
            dict(
                files,
                **{
                    model_file: files[model_file][:middle]
                    + bytes(4096)
                    + files[model_file][middle + 4096 :]
                },
            ),
        ),
    ):
        d = damaged.child(f"step-{step:09d}")
        for f, data in content.items():
            d.write_bytes(f, data)
        d.write_bytes(COMMIT, json.dumps(dict(commit, step=step)).encode())

    child = _Child(
        [
            "bad",
            f"s3://{run_bucket}/runs/ckpt-target",
            f"s3://{run_bucket}/runs/ckpt-other",
            f"s3://{run_bucket}/runs/ckpt-forged",
            f"s3://{run_bucket}/runs/ckpt-damaged",
        ],
        env,
        tmp_path,
    )
    out, err = child.communicate(timeout=180)
    assert child.returncode == 0, err[-3000:]
    res = _json_lines(out)[-1]
    print("refusals:", json.dumps(res, indent=1))

    rec = scenario("bad input: checkpoint of another model config")
    assert (
        res["other_config_checked"].startswith("ConfigMismatch")
        and "d_model" in res["other_config_checked"]
    ), res
    assert res["other_config_unchecked"].startswith(CLEAR), (
        res
    )  # DeepSpeed's strict load, translated
    rec.trial(True)

    rec = scenario("bad input: non-checkpoint file to resume")
    assert res["forged_2"].startswith("NotACheckpoint") and model_file in res["forged_2"], res
    assert res["forged_6"].startswith(CLEAR), res
    assert res["forged_8"].startswith("NotACheckpoint"), res
    rec.trial(True)

    rec = scenario("bad input: pickle with code")
    assert (
        res["forged_4"].startswith("UnsafeCheckpoint") and "nothing was executed" in res["forged_4"]
    ), res
    assert not marker.exists(), "the code in the pickle ran"
    rec.trial(True)

    rec = scenario("damaged newest commit: resume falls back")
    assert res["damaged_newest"] == "LOADED" and res["damaged_resumed"] == 2, res
    assert res["damaged_committed"] == [2, 4], (
        res
    )  # resuming deletes nothing; the next save replaces step 4
    assert (
        "its SHA-256 differs" in child.stderr()
        and "falling back to the previous committed step" in child.stderr()
    )
    rec.trial(True, steps_lost=4 - res["damaged_resumed"])


@pytest.mark.timeout(120)
def test_second_job_on_a_run_is_refused_and_a_crashed_holder_expires(
    chaos_store, run_bucket, tmp_path, s3_env_for, scenario
):
    """Two jobs with the same run name: the second is refused while the first one's heartbeat runs; once the
    first is SIGKILLed (no release), its lease is taken over after its ttl."""
    from ctm_dist.storage import Location
    from ctm_dist.train.checkpointer import Checkpointer, RunLocked

    env = s3_env_for()
    url, ttl = f"s3://{run_bucket}/runs/ckpt-two-jobs", 4.0
    holder = _Child(["hold", url, str(ttl)], env, tmp_path)
    try:
        line = holder.stdout.readline()
        assert line.strip() == "READY", line + holder.stderr()[-3000:]
        rec = scenario("second job with the same run name")
        second = Checkpointer(Location.parse(url), owner="job-b", lease_ttl=ttl)
        t0 = time.monotonic()
        with pytest.raises(
            RunLocked, match="being written by another job .*owner job-a"
        ) as refused:
            second.acquire()
        assert chaos_store.secret_key not in str(refused.value)
        rec.trial(
            True,
            recover_s=time.monotonic() - t0,
            note="refused while the first job's heartbeat runs",
        )
    finally:
        holder.proc.kill()
        holder.proc.communicate()
    rec = scenario("crashed job's lease: rerun takes over")
    killed = time.monotonic()
    second.acquire()
    waited = time.monotonic() - killed
    assert waited < 3 * ttl, waited
    second.close()
    rec.trial(True, recover_s=waited, note=f"lease ttl {ttl:.0f}s")
