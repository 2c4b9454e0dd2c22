"""Small models and data shared by the evaluation, export and plot tests."""

from __future__ import annotations

import io

import numpy as np
import torch
from PIL import Image

from ctm_dist.model import CTM, preset

TINY = dict(
    iterations=5,
    d_model=32,
    d_input=16,
    heads=2,
    n_synch_out=16,
    n_synch_action=16,
    memory_length=3,
    memory_hidden_dims=4,
)


def tiny_config(**overrides):
    values = {**TINY, **overrides}
    return preset("demo", **values)


def tiny_ctm(seed: int = 0, **overrides) -> CTM:
    torch.manual_seed(seed)
    np.random.seed(seed)  # the neuron pairs a random neuron_select_type draws
    return CTM(tiny_config(**overrides)).eval()


def write_digit_shards(location, split: str = "val", n: int = 40, seed: int = 0, size: int = 16):
    """A small classification shard set (demo task): random coloured images, labels 0..9."""
    from ctm_dist.data.writer import write_shard_set

    rng = np.random.default_rng(seed)
    samples = []
    for i in range(n):
        img = Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8))
        buf = io.BytesIO()
        img.save(buf, format="PNG")
        samples.append({"__key__": f"{i:06d}", "png": buf.getvalue(), "cls": str(i % 10).encode()})
    meta = {"num_classes": 10, "classes": [f"c{d}" for d in range(10)], "image_size": size}
    return write_shard_set(
        location, split, "demo", samples, samples_per_shard=16, meta=meta, total=n
    )


# A short real training run of the demo (the trainer's worker loop in one process, no Ray) into the
# embedded object store under ROOT/.ctm-dist, as `python launch/imagenet.py` leaves it: run
# s3://ctm-dist/runs/demo, shards at s3://ctm-dist/runs/demo-data, 8x8 inputs, the store stopped.
DEMO_RUN = "s3://ctm-dist/runs/demo"
DEMO_DATA = "s3://ctm-dist/runs/demo-data"
DEMO_OVERRIDES = [
    "run.name=demo",
    "run.storage=s3://ctm-dist/runs",
    f"data.url={DEMO_DATA}",
    "run.max_steps=60",
    "eval.every=0",
    "checkpoint.every=60",
    "data.batch_size=32",
    "scale.workers=1",
    "deepspeed.precision=fp32",
    "optim.lr=5e-3",
    "optim.warmup_steps=10",
    "model.overrides.d_model=64",
    "model.overrides.d_input=32",
    "model.overrides.iterations=4",
    "model.overrides.memory_length=4",
    "model.overrides.n_synch_out=32",
    "model.overrides.n_synch_action=32",
]


def train_demo_run(root: str) -> dict:
    """Train the demo run into ROOT's embedded store (in this process); returns rank 0's summary."""
    import os
    import socket

    import torch.distributed as dist

    from ctm_dist.data.demo_writer import write_demo_shards
    from ctm_dist.storage import Location
    from ctm_dist.storage.local import EMBEDDED_BUCKET, embedded_store
    from ctm_dist.train.cli import TASK_DEFAULTS
    from ctm_dist.train.config import build_config
    from ctm_dist.train.loop import Trainer

    local_dir = os.path.join(root, ".ctm-dist")
    cfg = build_config(
        None, DEMO_OVERRIDES + [f"run.local_dir={local_dir}"], base=TASK_DEFAULTS["demo"]
    )
    with embedded_store(local_dir) as store:
        store.create_bucket(EMBEDDED_BUCKET)
        os.environ.update(store.env())
        write_demo_shards(Location.parse(DEMO_DATA))
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(
            MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0"
        )
        torch.set_num_threads(1)
        dist.init_process_group("gloo", rank=0, world_size=1)
        summary = Trainer(cfg, 0, 1, torch.device("cpu")).fit()
        Location.parse(DEMO_RUN).get_dir(
            "checkpoints", os.path.join(root, "run-copy", "checkpoints")
        )
        dist.destroy_process_group()
    return {k: v for k, v in summary.items() if isinstance(v, (int, float, str))}


if __name__ == "__main__":
    import json
    import os
    import sys

    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    if sys.argv[1] == "train-demo":
        print(json.dumps(train_demo_run(sys.argv[2])))
    else:
        raise SystemExit(f"unknown child {sys.argv[1]!r}")
