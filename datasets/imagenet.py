#!/usr/bin/env python
"""Write ImageNet (ILSVRC2012) shard sets from the standard folder layout.

    python datasets/imagenet.py --root /data/ILSVRC2012 --split train --out s3://bucket/imagenet \
        --resize-shorter 256 --workers 16
    # flat validation images labelled by the devkit (ground truth + meta.mat):
    python datasets/imagenet.py --root /data/ILSVRC2012 --split val --devkit /data/ILSVRC2012_devkit_t12 --out ...
    # or by a "name wnid" mapping file (Kaggle's LOC_val_solution.csv works as is):
    python datasets/imagenet.py --root /data/ILSVRC2012 --split val --val-map LOC_val_solution.csv --out ...

Class index = sorted wnid order of root/train (as torchvision ImageFolder). S3 endpoint and keys come
from AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY.
"""

import argparse

from ctm_dist.data.imagenet_writer import write_imagenet_shards
from ctm_dist.data.writer import add_common_args, as_location, print_summary, run_script


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_common_args(parser)
    parser.add_argument("--root", required=True, help="folder holding train/ and val/")
    parser.add_argument("--source-split", help="folder under --root to read (default: --split)")
    parser.add_argument(
        "--resize-shorter", type=int, help="resize so that the shorter side has N pixels"
    )
    parser.add_argument("--quality", type=int, default=95, help="JPEG quality of re-encoded images")
    parser.add_argument(
        "--devkit",
        help="ILSVRC2012 devkit folder (data/ILSVRC2012_validation_ground_truth.txt, data/meta.mat)",
    )
    parser.add_argument(
        "--synsets", help="synset list: line k is the wnid of ILSVRC2012_ID k (instead of meta.mat)"
    )
    parser.add_argument(
        "--val-map", help="mapping file of 'name wnid' lines for flat validation images"
    )
    parser.add_argument(
        "--no-shuffle", action="store_true", help="keep sorted order (default: shuffled by --seed)"
    )
    args = parser.parse_args(argv)
    location = as_location(args.out)
    index, skipped = write_imagenet_shards(
        location,
        args.root,
        args.source_split or args.split,
        out_split=args.split,
        resize_shorter=args.resize_shorter,
        quality=args.quality,
        seed=args.seed,
        shuffle=not args.no_shuffle,
        samples_per_shard=args.samples_per_shard,
        workers=args.workers,
        mapping=args.val_map,
        devkit=args.devkit,
        synsets=args.synsets,
        progress=not args.no_progress,
    )
    print_summary(index, location, len(skipped))
    return 0


if __name__ == "__main__":
    run_script(main)
