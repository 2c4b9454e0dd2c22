#!/usr/bin/env python
"""Write the demo shard sets (train and val) from scikit-learn's bundled 8x8 digits: no download.

    python datasets/demo.py --out s3://bucket/demo
    python datasets/demo.py --out /tmp/demo --seed 3 --samples-per-shard 128

S3 endpoint and keys come from AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY.
"""

import argparse

from ctm_dist.data.demo_writer import write_demo_shards
from ctm_dist.data.writer import as_location, print_summary, run_script


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", required=True, help="s3://bucket/prefix, file:///dir or a path")
    parser.add_argument(
        "--split",
        choices=["train", "val", "both"],
        default="both",
        help="which split(s) to write; the train/val partition is fixed by --seed",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--samples-per-shard", type=int, default=256)
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    location = as_location(args.out)
    for index in write_demo_shards(
        location,
        seed=args.seed,
        samples_per_shard=args.samples_per_shard,
        progress=not args.no_progress,
        splits=("train", "val") if args.split == "both" else (args.split,),
    ).values():
        print_summary(index, location)
    return 0


if __name__ == "__main__":
    run_script(main)
