"""Bad inputs: each is a clear one-line error or a counted skip, never a hang or a silent wrong result.

Config mistakes go through the launchers' command line (what a user types; nothing starts); data
mistakes go through the training task's own loaders, reading a real shard set on the local S3
server, with a time bound on each so that a hang fails the test.
"""

from __future__ import annotations

import io
import socket
import time

import numpy as np
import pytest
from PIL import Image

from ctm_dist.train.cli import main as launcher_main

# ---------------------------------------------------------------- configuration


CONFIG_CASES = [
    # (case, argv (YAML text is written to a file and passed with --config), expected error text)
    (
        "bad YAML",
        "run:\n  name: x\n  max_steps: [1, 2\n",
        r"bad YAML in .*bad\.yaml \(line \d+, column \d+\)",
    ),
    ("YAML not a mapping", "- 1\n- 2\n", r"must hold a mapping of sections"),
    ("unknown field (YAML)", "run:\n  nme: x\n", r"unknown config field 'run\.nme'"),
    ("unknown section", ["foo.bar=1"], r"unknown config field 'foo'"),
    ("unknown model field", ["model.d_modle=3"], r"unknown config field 'model\.d_modle'"),
    ("wrong type", ["optim.lr=abc"], r"optim\.lr: expected a number, got 'abc'"),
    (
        "batch not divisible by workers",
        ["--workers", "3", "--batch-size", "8"],
        r"data\.batch_size=8 is not divisible by scale\.workers\*deepspeed\.grad_accumulation=3\*1=3",
    ),
    ("inconsistent eval batch", ["--workers", "2", "data.eval_batch_size=7"], r"eval_batch_size=7"),
    ("impossible value", ["--max-steps", "0"], r"run\.max_steps must be > 0"),
    (
        "offload without ZeRO",
        ["--zero-stage", "0", "deepspeed.offload_optimizer=true"],
        r"offload_optimizer needs",
    ),
    (
        "missing config file",
        ["--config", "/nonexistent/ctm.yaml"],
        r"cannot read config file /nonexistent/ctm\.yaml",
    ),
]


@pytest.mark.timeout(120)
def test_config_mistakes_fail_before_anything_starts(tmp_path, capsys, scenario):
    rec = scenario("bad input: config (11 cases)")
    for case, argv, expected in CONFIG_CASES:
        if isinstance(argv, str):
            path = tmp_path / "bad.yaml"
            path.write_text(argv)
            argv = ["--config", str(path)]
        t0 = time.monotonic()
        code = launcher_main("demo", argv + ["run.local_dir=" + str(tmp_path / "ld")])
        took = time.monotonic() - t0
        err = capsys.readouterr().err.strip().splitlines()
        import re

        ok = (
            code == 2
            and len(err) == 1
            and err[0].startswith("error: ")
            and re.search(expected, err[0])
        )
        rec.trial(bool(ok), recover_s=took, note=case)
        assert ok, f"{case}: exit {code}, stderr {err!r}"
        # Nothing was started or written: no Ray results, no embedded store.
        assert not (tmp_path / "ld").exists(), case


# ---------------------------------------------------------------- data

NUM_CLASSES = 10


def _png(rng, label: int) -> bytes:
    arr = rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)
    arr[:, :, label % 3] = 255
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def _samples(n: int) -> list[dict]:
    rng = np.random.default_rng(0)
    return [
        {
            "__key__": f"k{i:04d}",
            "png": _png(rng, i % NUM_CLASSES),
            "cls": str(i % NUM_CLASSES).encode(),
            "json": b"{}",
        }
        for i in range(n)
    ]


def _write(loc, split, samples, per_shard=10):
    from ctm_dist.data.writer import ShardSetWriter

    meta = {
        "num_classes": NUM_CLASSES,
        "classes": [str(i) for i in range(NUM_CLASSES)],
        "image_size": 16,
    }
    with ShardSetWriter(loc, split, "demo", per_shard, meta) as w:
        for s in samples:
            w.write(s)


def _task(url: str, workers: int = 1, rank: int = 0, batch: int = 4):
    from ctm_dist.train.config import build_config
    from ctm_dist.tasks import make_task

    cfg = build_config(
        overrides=[
            f"data.url={url}",
            "data.task=demo",
            f"scale.workers={workers}",
            f"data.batch_size={batch * workers}",
            f"data.eval_batch_size={batch * workers}",
        ]
    )
    return make_task(cfg, rank, workers)


def _epoch(loader, timeout: float):
    """Keys of valid entries of one epoch; fails if the epoch does not end within ``timeout``."""
    t0, keys = time.monotonic(), []
    for batch in loader:
        keys += [k for k, v in zip(batch["key"], batch["valid"].tolist()) if v]
        assert time.monotonic() - t0 < timeout, "the loader did not finish its epoch in time"
    return keys


@pytest.mark.timeout(120)
def test_corrupt_data_is_skipped_and_counted(chaos_location, s3_env_for, scenario):
    """Undecodable image, label out of range, missing label and a truncated tar in one training split:
    the task's training loader finishes the epoch, masks exactly those samples and counts each reason."""
    rec = scenario("bad input: corrupt shard/image/label")
    s3_env_for(chaos_location)
    samples = _samples(40)
    samples[3]["png"] = b"\x89PNG\r\n\x1a\n truncated image"
    samples[14]["cls"] = b"57"  # out of range for 10 classes
    samples[15]["cls"] = b"-1"
    del samples[25]["cls"]  # no label at all
    data = chaos_location.child("corrupt")
    _write(data, "train", samples)
    raw = data.read_bytes("train-000003.tar")  # samples 30..39
    data.write_bytes("train-000003.tar", raw[: len(raw) // 2])
    t0 = time.monotonic()
    task = _task(data.url)
    loader = task.train_loader(4, seed=0)
    keys = _epoch(loader, timeout=60)
    bad = {"k0003", "k0014", "k0015", "k0025"}
    assert len(keys) == len(set(keys)), "a sample was yielded twice"
    assert not bad & set(keys), "a bad sample reached the model"
    assert {s["__key__"] for s in samples[:30]} - bad == {k for k in keys if k < "k0030"}
    lost_tail = 10 - len([k for k in keys if k >= "k0030"])
    assert 0 < lost_tail < 10, (
        "the readable part of the truncated shard should be used, the rest skipped"
    )
    st = loader.stats
    assert st["skipped_bad_sample"] == 4
    assert st["skipped_unreadable_tar"] + st.get("skipped_missing", 0) == lost_tail
    assert st["samples"] == len(keys) and st["skipped"] == 4 + lost_tail
    assert any("k0003" in m and "undecodable image" in m for m in loader.skip_log)
    assert any("k0014" in m and "outside [0, 10)" in m for m in loader.skip_log)
    rec.trial(True, recover_s=time.monotonic() - t0, note=f"{st['skipped']} skipped of 40")


@pytest.mark.timeout(120)
def test_missing_index_shard_credentials_endpoint_fail_clearly(
    chaos_store, chaos_location, s3_env_for, monkeypatch, scenario
):
    from ctm_dist.storage import StorageAccessDenied, StorageError, StorageNotFound

    data = chaos_location.child("ok")
    _write(data, "train", _samples(20))
    s3_env_for(chaos_location)

    rec = scenario("bad input: missing shard index")
    t0 = time.monotonic()
    with pytest.raises(
        FileNotFoundError, match=r"no shard index 'train\.json' at s3://.*/nothing-here"
    ):
        _task(chaos_location.child("nothing-here").url)
    rec.trial(True, recover_s=time.monotonic() - t0)

    rec = scenario("bad input: missing shard")
    gone = chaos_location.child("gone")
    _write(gone, "train", _samples(20))
    gone.rm("train-000001.tar")
    t0 = time.monotonic()
    with pytest.raises(StorageNotFound, match=r"train-000001\.tar"):
        _task(gone.url).train_loader(4, seed=0)
    rec.trial(True, recover_s=time.monotonic() - t0)

    rec = scenario("bad input: wrong credentials")
    wrong = "wrong-secret-0123456789abcdef"
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", wrong)
    t0 = time.monotonic()
    with pytest.raises(StorageAccessDenied, match="access denied") as info:
        _task(data.url)
    took = time.monotonic() - t0
    assert wrong not in str(info.value) and chaos_store.secret_key not in str(info.value)
    assert took < 15, f"refused credentials must fail fast, not be retried ({took:.1f}s)"
    rec.trial(True, recover_s=took)

    rec = scenario("bad input: unreachable endpoint")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", chaos_store.secret_key)
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{port}")
    from ctm_dist.data.reader import ShardLoader
    from ctm_dist.storage import Location

    t0 = time.monotonic()
    with pytest.raises(StorageError, match=r"endpoint unreachable .*AWS_ENDPOINT_URL") as info:
        ShardLoader(Location.parse(data.url, retry_deadline=3), "train", batch_size=4)
    took = time.monotonic() - t0
    assert chaos_store.secret_key not in str(info.value)
    assert 3 <= took < 30, f"should retry until the 3 s deadline, then stop ({took:.1f}s)"
    rec.trial(True, recover_s=took)
