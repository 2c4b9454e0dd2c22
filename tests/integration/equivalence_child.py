"""One rank of the distributed-equivalence runs: the real Trainer (DeepSpeed, gloo) for each case in turn.

Run as ``python equivalence_child.py RANK WORLD_SIZE PORT CASES_JSON``, one process per rank of a
gloo group on 127.0.0.1:PORT (no Ray). ``CASES_JSON`` is a list of ``{"name": ..., "overrides":
[...]}``; each case is a whole ``Trainer.fit()`` under the run name ``name`` with those dotted
overrides plus ``scale.workers=WORLD_SIZE``. Rank 0 of each case writes TensorBoard events (the
per-step ``train/loss``) under ``run.local_dir``, which the test reads. Storage endpoint and keys
come from the AWS_* variables.

The process group is made once and kept for every case: DeepSpeed caches the world group.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time

import torch
import torch.distributed as dist

from ctm_dist.train.config import build_config
from ctm_dist.train.loop import Trainer


def main(rank: int, world_size: int, port: int, cases: list[dict]) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world_size),
    )
    torch.set_num_threads(1)  # tiny model; and the 2-core machine runs all ranks at once
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size
    )
    for case in cases:
        started = time.perf_counter()
        cfg = build_config(
            overrides=[
                f"run.name={case['name']}",
                *case["overrides"],
                f"scale.workers={world_size}",
            ]
        )
        trainer = Trainer(cfg, rank, world_size, torch.device("cpu"))
        try:
            trainer.fit()
        finally:
            trainer.checkpointer.close()
        dist.barrier()
        if rank == 0:
            print(f"{case['name']}: {time.perf_counter() - started:.1f}s", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), json.loads(sys.argv[4]))
