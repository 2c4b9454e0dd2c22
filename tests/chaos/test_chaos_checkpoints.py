"""Checkpoints under fire: a process SIGKILLed in the middle of a checkpoint upload, the store going
away during a checkpoint write, and checkpoints that must be refused (another model config, files
that are not checkpoints, a pickle that carries code).

A checkpoint is either complete and loadable or invisible: the partial one is never picked, the
previous commit is resumed, and the debris is removed by a later save.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import chaos_harness as H

CHILD = Path(__file__).with_name("ckpt_child.py")


class _CodeInPickle:
    """Unpickling this runs a shell command (what a malicious checkpoint would do)."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _child(args: list[str], env: dict, **kw) -> subprocess.Popen:
    full = dict(os.environ)
    full.update(env)
    full["PYTHONUNBUFFERED"] = "1"
    return subprocess.Popen([sys.executable, str(CHILD), *args], env=full, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, stdin=subprocess.PIPE, text=True, **kw)


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


@pytest.mark.timeout(300)
def test_crash_mid_upload_then_store_outage_during_checkpoint_writes(chaos_store, run_bucket, run_location,
                                                                    rng, s3_env_for, scenario):
    env = s3_env_for()
    name = "ckpt-crash"
    run_url = f"s3://{run_bucket}/runs/{name}"
    loc = run_location(name)

    # 1. SIGKILL right after the n-th file of step 4 reached the store (n=3: every file, no COMMIT yet).
    rec = scenario("crash mid checkpoint upload")
    after = rng.randint(1, 3)
    child = _child(["crash-upload", run_url, "4", str(after)], env)
    out, err = child.communicate(timeout=180)
    assert child.returncode == -9, f"the child should have died by SIGKILL: rc={child.returncode}\n{err[-3000:]}"
    lines = _json_lines(out)
    assert lines[0]["committed"] == [2] and "killing_after" in lines[-1], out
    assert "step-000000004" in H.all_checkpoint_dirs(loc), "the partial checkpoint should be in the store"
    assert H.committed_steps(loc) == [2], "the partial checkpoint must not look committed"
    ck = _checkpointer(run_url)
    assert ck.committed_steps() == [2] and ck.latest_committed() == 2

    # 2. Resume (must pick 2, not the partial 4); then the store goes down while step 6 is written.
    child = _child(["outage", run_url], env)
    ready = child.stdout.readline()
    assert ready.strip() == "READY", ready + child.stderr.read()[-3000:]
    outage = H.Outage(chaos_store, 10.0).start()
    H.wait_until(lambda: outage.stopped_at, 30, what="the store to stop")
    child.stdin.write("go\n")
    child.stdin.flush()
    out, err = child.communicate(timeout=180)
    outage.join()
    assert child.returncode == 0, err[-3000:]
    result = _json_lines(out)[-1]
    assert result["resumed"] == 2 and result["extra_ok"], result
    rec.trial(True, steps_lost=2, note=f"killed after {after} file(s); resumed from 2")

    rec = scenario("store outage > deadline: checkpoint write")
    assert result["short_deadline"].startswith("CheckpointError") or "Storage" in result["short_deadline"], result
    assert "endpoint unreachable" in result["short_deadline"] or "unreachable" in result["short_deadline"], result
    assert chaos_store.secret_key not in result["short_deadline"]
    assert result["short_s"] < 10.0, f"a 3 s deadline should give up well before the store returns: {result}"
    rec.trial(True, recover_s=result["short_s"], note="clear error, previous commit kept")

    rec = scenario("store outage 10s: checkpoint write")
    assert result["long_deadline"] == "saved", result
    assert result["committed"] == [2, 6], result
    rec.trial(True, steps_lost=0, recover_s=max(0.0, result["saved_at"] - outage.up_at),
              note=f"save took {result['long_s']:.1f}s")

    # 3. The debris of the crashed step 4 (older than the newest commit) is gone after the next save.
    assert "step-000000004" not in H.all_checkpoint_dirs(loc)
    assert H.committed_steps(loc) == [2, 6]


@pytest.mark.timeout(300)
def test_checkpoints_that_must_be_refused(chaos_store, run_bucket, run_location, tmp_path, s3_env_for, scenario):
    """Another model config, a file that is not a checkpoint, a foreign torch file and a pickle with
    code, each placed where a committed checkpoint would be: every load fails with a clear
    CheckpointError subclass, and the code in the pickle never runs."""
    from ctm_dist.train.checkpointer import COMMIT

    env = s3_env_for()
    source_url = f"s3://{run_bucket}/runs/ckpt-source"
    # A genuine one-rank checkpoint to forge from: the crash child commits step 2 before dying.
    child = _child(["crash-upload", source_url, "4", "1"], env)
    out, err = child.communicate(timeout=180)
    assert child.returncode == -9, err[-3000:]
    src = run_location("ckpt-source").child("checkpoints").child("step-000000002")
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
        2: {model_file: b"this is not a checkpoint".ljust(len(files[model_file]), b"#")},  # same size
        4: {extra_file: evil.getvalue()},
        6: {model_file: foreign.getvalue()},
        8: {model_file: files[model_file][: len(files[model_file]) // 2]},                 # truncated
    }
    forged = run_location("ckpt-forged").child("checkpoints")
    for step, replaced in forgeries.items():
        d = forged.child(f"step-{step:09d}")
        content = dict(files, **replaced)
        for f, data in content.items():
            d.write_bytes(f, data)
        d.write_bytes(COMMIT, json.dumps(dict(commit, step=step, files={f: len(b) for f, b in content.items()})).encode())

    t0 = time.monotonic()
    child = _child(["bad", f"s3://{run_bucket}/runs/ckpt-target", f"s3://{run_bucket}/runs/ckpt-other",
                    f"s3://{run_bucket}/runs/ckpt-forged"], env)
    out, err = child.communicate(timeout=180)
    assert child.returncode == 0, err[-3000:]
    took = time.monotonic() - t0
    res = _json_lines(out)[-1]

    rec = scenario("bad input: checkpoint of another model config")
    assert res["other_config_checked"].startswith("ConfigMismatch") and "d_model" in res["other_config_checked"], res
    assert res["other_config_unchecked"] != "LOADED" and "Error" in res["other_config_unchecked"].split(":")[0], res
    rec.trial(True, recover_s=took)

    rec = scenario("bad input: non-checkpoint file to resume")
    assert res["forged_2"].startswith("NotACheckpoint") and model_file in res["forged_2"], res
    assert res["forged_6"] != "LOADED" and res["forged_6"].split(":")[0].endswith(("Checkpoint", "CheckpointError")), res
    assert res["forged_8"].startswith("NotACheckpoint"), res
    rec.trial(True, recover_s=took)

    rec = scenario("bad input: pickle with code")
    assert res["forged_4"].startswith("UnsafeCheckpoint") and "nothing was executed" in res["forged_4"], res
    assert not marker.exists(), "the code in the pickle ran"
    rec.trial(True, recover_s=took)
