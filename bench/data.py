"""Reader throughput: shards streamed from the local S3 server vs the same shards on local disk.

    python bench/data.py                       # 2000 synthetic ~400x350 JPEGs, ~1-2 min
    python bench/data.py --samples 500 --no-step
    python bench/data.py --decode-only --width 500 --height 375   # decode rate per core

Writes a synthetic ImageNet-format shard set once to a local directory and (the same tar files)
to a LocalObjectStore bucket, then measures, in this one process (one thread, like one
dataloader worker):

* raw MB/s streaming every tar through ``Location.open``;
* decoded samples/s of ``ShardLoader`` (train transforms) at 224 px and at the demo's 32 px;
* decoded samples/s of the demo shard set (``write_demo_shards``) from S3;
* the samples/s one demo-preset training step consumes (forward, loss, backward, AdamW on a
  batch of ``--step-batch``), and the ratio reader / step.
"""

from __future__ import annotations

import argparse
import io
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from ctm_dist.data.demo_writer import write_demo_shards  # noqa: E402
from ctm_dist.data.reader import STREAM_BLOCK, ShardLoader  # noqa: E402
from ctm_dist.data.writer import ShardSetWriter  # noqa: E402
from ctm_dist.model import CTM, preset  # noqa: E402
from ctm_dist.storage import LocalObjectStore, Location  # noqa: E402


def photo_like_bases(
    rng: np.random.Generator, width: int, height: int, n: int = 8
) -> list[np.ndarray]:
    """Smooth colour gradients with mild noise (JPEG-compressible like photos, unlike white noise)."""
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    bases = []
    for _ in range(n):
        img = np.empty((height, width, 3), np.float32)
        for c in range(3):
            a, b, p = rng.uniform(-1, 1, 3)
            img[..., c] = 128 + 80 * np.sin(a * xx / 40 + b * yy / 55 + p * 6)
        img += rng.normal(0, 6, img.shape).astype(np.float32)
        bases.append(np.clip(img, 0, 255).astype(np.uint8))
    return bases


def synthetic_jpeg(rng: np.random.Generator, bases: list[np.ndarray]) -> bytes:
    """One of ``bases`` shifted at random with a few solid blobs drawn on it, as a JPEG."""
    img = np.roll(
        bases[int(rng.integers(len(bases)))],
        (int(rng.integers(0, 100)), int(rng.integers(0, 100))),
        axis=(0, 1),
    ).copy()
    height, width = img.shape[:2]
    for _ in range(3):
        cy, cx, r = (
            int(rng.integers(0, height)),
            int(rng.integers(0, width)),
            int(rng.integers(10, 60)),
        )
        img[max(0, cy - r) : cy + r, max(0, cx - r) : cx + r] = rng.integers(
            0, 255, 3, dtype=np.uint8
        )
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def write_set(
    local: Location, n: int, width: int, height: int, per_shard: int, seed: int = 0
) -> None:
    rng = np.random.default_rng(seed)
    bases = photo_like_bases(rng, width, height)
    meta = {"num_classes": 10, "classes": [str(i) for i in range(10)], "image_size": None}
    with ShardSetWriter(local, "train", "imagenet", per_shard, meta) as w:
        for i in range(n):
            w.write(
                {
                    "__key__": f"{i:08d}",
                    "jpg": synthetic_jpeg(rng, bases),
                    "cls": str(i % 10).encode(),
                    "json": b"{}",
                }
            )


def raw_mb_per_s(loc: Location, names: list[str]) -> float:
    total, start = 0, time.perf_counter()
    kwargs = {"block_size": STREAM_BLOCK} if loc.protocol != "file" else {}
    for name in names:
        with loc.open(name, "rb", **kwargs) as f:
            while chunk := f.read(1 << 20):
                total += len(chunk)
    return total / (time.perf_counter() - start) / 1e6


def samples_per_s(
    loc: Location, split: str, task: str, image_size: int, batch: int, per_cpu_second: bool = False
) -> float:
    """Decoded samples per wall second, or per CPU second of this process (one thread: per core,
    whatever else runs on the machine)."""
    loader = ShardLoader(
        loc, split, task, batch_size=batch, num_workers=0, seed=0, train=True, image_size=image_size
    )
    n, start, cpu_start = 0, time.perf_counter(), time.process_time()
    for b in loader:
        n += int(b["valid"].sum())
    return n / (
        (time.process_time() - cpu_start) if per_cpu_second else (time.perf_counter() - start)
    )


def demo_step_seconds(batch: int, steps: int = 2) -> float:
    """Median time of one demo-preset training step (forward, certainty-style loss, backward, AdamW)."""
    torch.manual_seed(0)
    model = CTM(preset("demo"))
    x = torch.randn(batch, 3, 32, 32)
    y = torch.randint(0, 10, (batch,))
    with torch.no_grad():
        model(x[:2])  # materialise lazy layers
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    times = []
    for i in range(steps + 1):
        start = time.perf_counter()
        predictions, certainties, _ = model(x)
        loss = torch.nn.functional.cross_entropy(
            predictions.permute(0, 2, 1).reshape(-1, predictions.size(1)),
            y.repeat_interleave(predictions.size(2)),
        )
        opt.zero_grad()
        loss.backward()
        opt.step()
        if i:  # the first step warms up
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--samples", type=int, default=2000)
    p.add_argument("--width", type=int, default=400)
    p.add_argument("--height", type=int, default=350)
    p.add_argument("--per-shard", type=int, default=250)
    p.add_argument("--batch", type=int, default=64, help="reader batch size")
    p.add_argument(
        "--step-batch", type=int, default=64, help="demo step batch (the demo's data.batch_size)"
    )
    p.add_argument("--no-step", action="store_true", help="skip timing the demo training step")
    p.add_argument("--dir", help="scratch directory (default: a temporary one)")
    p.add_argument(
        "--decode-only",
        action="store_true",
        help="only the decode rate per core from local disk (train transforms), per output size",
    )
    args = p.parse_args()

    torch.set_num_threads(1)  # one dataloader worker's view
    with tempfile.TemporaryDirectory(prefix="bench-data-", dir=args.dir) as tmp:
        local = Location.parse(os.path.join(tmp, "shards"))
        t0 = time.perf_counter()
        write_set(local, args.samples, args.width, args.height, args.per_shard)
        names = [n for n in local.list() if n.endswith(".tar")]
        size_mb = sum(os.path.getsize(local.join(n)) for n in names) / 1e6
        print(
            f"wrote {args.samples} JPEGs {args.width}x{args.height} in {len(names)} shards, "
            f"{size_mb:.1f} MB, {time.perf_counter() - t0:.1f}s"
        )
        if args.decode_only:
            print(
                "\n| output px | samples per CPU-second (one worker, one core) | samples per wall second |"
            )
            print("| ---: | ---: | ---: |")
            for size in (224, 32):
                per_core = samples_per_s(
                    local, "train", "imagenet", size, args.batch, per_cpu_second=True
                )
                wall = samples_per_s(local, "train", "imagenet", size, args.batch)
                print(f"| {size} | {per_core:.0f} | {wall:.0f} |")
            return
        with LocalObjectStore(os.path.join(tmp, "s3")) as store:
            store.create_bucket("bench")
            s3 = Location.parse(
                "s3://bench/shards",
                endpoint_url=store.endpoint_url,
                key=store.access_key,
                secret=store.secret_key,
            )
            for n in names + ["train.json"]:
                s3.put_file(local.join(n), n)
            demo = s3.child("demo")
            write_demo_shards(demo, splits=("train",))

            rows = []
            for label, loc in (("local disk", local), ("local S3", s3)):
                rows.append(
                    (
                        label,
                        raw_mb_per_s(loc, names),
                        samples_per_s(loc, "train", "imagenet", 224, args.batch),
                        samples_per_s(loc, "train", "imagenet", 32, args.batch),
                    )
                )
            demo_rate = samples_per_s(demo, "train", "demo", 32, args.batch)

        print("\n| source | raw MB/s | samples/s @224 (train) | samples/s @32 (train) |")
        print("| --- | ---: | ---: | ---: |")
        for label, mb, s224, s32 in rows:
            print(f"| {label} | {mb:.0f} | {s224:.0f} | {s32:.0f} |")
        disk, s3row = rows
        print(
            f"\nS3/disk: raw {s3row[1] / disk[1]:.2f}x, samples@224 {s3row[2] / disk[2]:.2f}x, "
            f"samples@32 {s3row[3] / disk[3]:.2f}x"
        )
        print(f"demo shard set (32 px PNG digits) from S3: {demo_rate:.0f} samples/s per worker")

    if not args.no_step:
        torch.set_num_threads(os.cpu_count() or 1)
        step = demo_step_seconds(args.step_batch)
        need = args.step_batch / step
        print(
            f"\ndemo-preset training step, batch {args.step_batch}: {step * 1000:.0f} ms "
            f"-> consumes {need:.0f} samples/s"
        )
        print(
            f"reader/step ratio (one worker, from S3): demo shards {demo_rate / need:.1f}x, "
            f"ImageNet-format @32 {s3row[3] / need:.1f}x, @224 {s3row[2] / need:.1f}x"
        )


if __name__ == "__main__":
    main()
