#!/usr/bin/env python
"""Write maze shard sets: generated perfect mazes, or a folder of the reference's released maze PNGs.

    python datasets/mazes.py --out s3://bucket/mazes-medium --split train --count 50000 --size medium
    python datasets/mazes.py --out /data/mazes-small --split test --count 1000 --pixels 19 --seed 1
    python datasets/mazes.py --out s3://bucket/mazes-ref --split train --from-folder data/mazes/medium/train

S3 endpoint and keys come from AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY.
"""

import argparse

from ctm_dist.data.mazes_gen import SIZES
from ctm_dist.data.mazes_writer import (
    DEFAULT_ROUTE_LENGTH,
    write_maze_folder_shards,
    write_maze_shards,
)
from ctm_dist.data.writer import add_common_args, as_location, print_summary, run_script


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_common_args(parser)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--count", type=int, help="generate this many mazes")
    source.add_argument(
        "--from-folder",
        metavar="DIR",
        help="convert reference maze PNGs (solution in blue) under DIR",
    )
    parser.add_argument(
        "--size",
        choices=sorted(SIZES),
        default="medium",
        help="small 19x19, medium 39x39, large 99x99 pixels (generation)",
    )
    parser.add_argument("--pixels", type=int, help="any odd image side in pixels instead of --size")
    parser.add_argument(
        "--route-length",
        type=int,
        default=DEFAULT_ROUTE_LENGTH,
        help="moves per target: padded with Wait (4), truncated if longer",
    )
    parser.add_argument(
        "--no-shuffle", action="store_true", help="keep the folder's sorted order (--from-folder)"
    )
    args = parser.parse_args(argv)
    location = as_location(args.out)
    common = dict(
        route_length=args.route_length,
        seed=args.seed,
        samples_per_shard=args.samples_per_shard,
        workers=args.workers,
        progress=not args.no_progress,
    )
    if args.count is not None:
        index = write_maze_shards(
            location, args.split, args.count, args.pixels or args.size, **common
        )
        print_summary(index, location)
    else:
        index, skipped = write_maze_folder_shards(
            location, args.split, args.from_folder, shuffle=not args.no_shuffle, **common
        )
        print_summary(index, location, len(skipped))
    return 0


if __name__ == "__main__":
    run_script(main)
