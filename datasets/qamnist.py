#!/usr/bin/env python
"""Write the Q&A MNIST digit shard sets (train and val); questions are drawn from them while training.

    python datasets/qamnist.py --mnist /data/mnist --out s3://bucket/qamnist
    python datasets/qamnist.py --digits --out /tmp/qamnist-digits      # offline: scikit-learn's 8x8 digits

--mnist reads MNIST's IDX files (train-images-idx3-ubyte, train-labels-idx1-ubyte,
t10k-images-idx3-ubyte, t10k-labels-idx1-ubyte; gzipped or not; also under MNIST/raw/).
S3 endpoint and keys come from AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY.
"""

import argparse

from ctm_dist.data.qamnist_writer import mnist_splits, sklearn_digits_splits, write_qamnist_shards
from ctm_dist.data.writer import as_location, print_summary, run_script


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--mnist", metavar="DIR", help="folder with MNIST's IDX files")
    source.add_argument(
        "--digits", action="store_true", help="scikit-learn's bundled 8x8 digits (no download)"
    )
    parser.add_argument("--out", required=True, help="s3://bucket/prefix, file:///dir or a path")
    parser.add_argument(
        "--seed", type=int, default=0, help="train/val partition of --digits (MNIST has its own)"
    )
    parser.add_argument("--samples-per-shard", type=int, default=1000)
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    location = as_location(args.out)
    if args.mnist:
        splits, name = mnist_splits(args.mnist), "mnist"
    else:
        splits, name = sklearn_digits_splits(args.seed), "sklearn-digits"
    indexes = write_qamnist_shards(
        location,
        splits,
        name,
        samples_per_shard=args.samples_per_shard,
        progress=not args.no_progress,
    )
    for index in indexes.values():
        print_summary(index, location)
    return 0


if __name__ == "__main__":
    run_script(main)
