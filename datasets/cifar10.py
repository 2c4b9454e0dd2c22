#!/usr/bin/env python
"""Write CIFAR-10 shard sets from the python-version batches (cifar-10-batches-py).

    python datasets/cifar10.py --source /data/cifar-10-batches-py --split train --out s3://bucket/cifar10
    python datasets/cifar10.py --source /data/cifar-10-batches-py --split test --out s3://bucket/cifar10

S3 endpoint and keys come from AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY.
"""

import argparse

from ctm_dist.data.cifar10_writer import PARTS, write_cifar10_shards
from ctm_dist.data.writer import add_common_args, as_location, print_summary, run_script


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_common_args(parser, workers=False)
    parser.add_argument(
        "--source", required=True, help="folder with data_batch_1..5, test_batch, batches.meta"
    )
    parser.add_argument(
        "--part",
        choices=sorted(PARTS),
        help="batches to read (default: train for split train, else test)",
    )
    parser.add_argument(
        "--no-shuffle", action="store_true", help="keep batch order (default: shuffled by --seed)"
    )
    args = parser.parse_args(argv)
    location = as_location(args.out)
    index = write_cifar10_shards(
        location,
        args.source,
        args.split,
        part=args.part,
        seed=args.seed,
        shuffle=not args.no_shuffle,
        samples_per_shard=args.samples_per_shard,
        progress=not args.no_progress,
    )
    print_summary(index, location)
    return 0


if __name__ == "__main__":
    run_script(main)
