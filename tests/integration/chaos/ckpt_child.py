"""A one-rank trainer stand-in for the checkpoint scenarios: a real tiny CTM in a real DeepSpeed
engine (ZeRO-2, bf16, gloo world of 1) saving to the real store through the real Checkpointer.

It runs as a subprocess so that it can die by SIGKILL at an exact point of an upload, and so that
the test process never initialises torch.distributed. Commands (argv[1]):

* ``crash-upload RUN_URL STEP N`` - commit step 2, then save STEP and SIGKILL itself right after the
  N-th file of that save reached the store (before COMMIT).
* ``bad RUN_URL OTHER_URL FORGED_URL DAMAGED_URL`` - save a wider model's checkpoint to OTHER_URL and try
  to load it; try to load every committed step under FORGED_URL; resume from DAMAGED_URL (its newest step
  is damaged); print one JSON line {case: error}.
* ``hold RUN_URL TTL`` - take the run's lease as job ``job-a`` (lease ttl TTL s), print ``READY`` and keep
  it (heartbeat running) until killed.
* ``outage RUN_URL`` - resume from the newest commit; print ``READY``; after a line on stdin, save
  step 6 with a 3 s deadline (must fail: the store is down), then with a 60 s deadline (must
  succeed once the store is back); print one JSON line with what happened.

Storage endpoint and keys come from the AWS_* variables.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
import time


def engine_and_config():
    import torch.distributed as dist

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import chaos_runs as R

    from ctm_dist.model import CTM
    from ctm_dist.train.engine import build_engine
    from ctm_dist.train.loop import seed_everything

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0"
    )
    dist.init_process_group("gloo", rank=0, world_size=1)
    cfg = R.tiny_config(
        name="ckpt",
        storage="s3://unused",
        data="s3://unused",
        local_dir="/tmp",
        steps=10,
        workers=1,
    )
    seed_everything(0)
    from ctm_dist.model import preset

    model_cfg = preset(cfg.model.preset, out_dims=10, **cfg.model.overrides)
    return build_engine(CTM(model_cfg), cfg), cfg


def checkpointer(run_url: str, deadline: float | None = None):
    from ctm_dist.storage import Location
    from ctm_dist.train.checkpointer import Checkpointer

    # a short lease: the SIGKILLed child's lease is taken over by the next one after 6 s without heartbeat
    return Checkpointer(
        Location.parse(run_url),
        keep_last=5,
        rank=0,
        world_size=1,
        retry_deadline=deadline,
        lease_ttl=6.0,
    )


def extra(step: int) -> dict:
    from ctm_dist.train import rng

    return {"data": {"format": "chaos-test", "step": step}, "rng": rng.capture()}


def crash_upload(run_url: str, step: int, after_files: int) -> None:
    from ctm_dist.storage import Location

    engine, cfg = engine_and_config()
    ck = checkpointer(run_url)
    ck.save(2, engine, extra(2), config=cfg.to_dict())
    print(json.dumps({"committed": ck.committed_steps()}), flush=True)
    real_put = Location.put_file
    uploaded = []

    def put_then_die(self, local_path, name):
        real_put(self, local_path, name)
        if name.startswith(f"step-{step:09d}/"):
            uploaded.append(name)
            if len(uploaded) >= after_files:
                print(json.dumps({"killing_after": uploaded}), flush=True)
                os.kill(os.getpid(), signal.SIGKILL)

    Location.put_file = put_then_die
    ck.save(step, engine, extra(step), config=cfg.to_dict())
    print(
        json.dumps({"error": "the save finished although the process should have died"}), flush=True
    )


def outage(run_url: str) -> None:
    from ctm_dist.train.checkpointer import CheckpointError

    engine, cfg = engine_and_config()
    out: dict = {}
    step, state = checkpointer(run_url).load_latest(engine, config=cfg.to_dict())
    out["resumed"] = step
    out["extra_ok"] = state["data"] == {"format": "chaos-test", "step": step}
    print("READY", flush=True)
    sys.stdin.readline()
    t0 = time.monotonic()
    try:
        checkpointer(run_url, deadline=3).save(6, engine, extra(6), config=cfg.to_dict())
        out["short_deadline"] = "saved"
    except CheckpointError as e:
        out["short_deadline"] = str(e)
    except Exception as e:  # noqa: BLE001 - reported, the test says it should have been a CheckpointError
        out["short_deadline"] = f"UNEXPECTED {type(e).__name__}: {e}"
    out["short_s"] = time.monotonic() - t0
    out["short_failed_at"] = (
        time.monotonic()
    )  # CLOCK_MONOTONIC: the test process reads the same clock
    t1 = time.monotonic()
    try:
        checkpointer(run_url, deadline=60).save(6, engine, extra(6), config=cfg.to_dict())
        out["long_deadline"] = "saved"
    except Exception as e:  # noqa: BLE001
        out["long_deadline"] = f"{type(e).__name__}: {e}"
    out["long_s"] = time.monotonic() - t1
    out["saved_at"] = time.monotonic()
    out["committed"] = checkpointer(run_url).committed_steps()
    print(json.dumps(out), flush=True)


def hold(run_url: str, ttl: float) -> None:
    from ctm_dist.storage import Location
    from ctm_dist.train.checkpointer import Checkpointer

    Checkpointer(Location.parse(run_url), owner="job-a", lease_ttl=ttl).acquire()
    print("READY", flush=True)
    while True:
        time.sleep(60)


def bad(run_url: str, other_url: str, forged_url: str, damaged_url: str) -> None:
    """Load what must be refused; print one JSON line {case: error text or 'LOADED'}."""
    from ctm_dist.model import CTM, preset
    from ctm_dist.storage import Location
    from ctm_dist.train.checkpointer import Checkpointer
    from ctm_dist.train.engine import build_engine

    engine, cfg = engine_and_config()
    # A run of another model config (wider), saved through the same code.
    other_cfg = cfg.to_dict()
    other_cfg["model"]["overrides"] = dict(other_cfg["model"]["overrides"], d_model=48)
    other = build_engine(
        CTM(preset(cfg.model.preset, out_dims=10, **other_cfg["model"]["overrides"])), cfg
    )
    checkpointer(other_url).save(2, other, extra(2), config=other_cfg)
    out = {}

    def attempt(case, fn):
        try:
            fn()
            out[case] = "LOADED"
        except Exception as e:  # noqa: BLE001 - the test checks type and text
            out[case] = f"{type(e).__name__}: {e}"

    attempt(
        "other_config_checked", lambda: checkpointer(other_url).load(engine, config=cfg.to_dict())
    )
    attempt("other_config_unchecked", lambda: checkpointer(other_url).load(engine))
    forged = Checkpointer(Location.parse(forged_url), keep_last=5)
    for step in forged.committed_steps():
        attempt(
            f"forged_{step}", lambda step=step: forged.load(engine, step=step, config=cfg.to_dict())
        )
    damaged = Checkpointer(Location.parse(damaged_url), keep_last=1)
    attempt(
        "damaged_newest",
        lambda: out.update(damaged_resumed=damaged.load_latest(engine, config=cfg.to_dict())[0]),
    )
    out["damaged_committed"] = damaged.committed_steps()
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    cmd = sys.argv[1]
    if cmd == "crash-upload":
        crash_upload(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
    elif cmd == "bad":
        bad(sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5])
    elif cmd == "hold":
        hold(sys.argv[2], float(sys.argv[3]))
    elif cmd == "outage":
        outage(sys.argv[2])
    else:
        raise SystemExit(f"unknown command {cmd}")
