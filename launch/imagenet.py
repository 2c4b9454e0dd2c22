"""Train the CTM on ImageNet shards; with no --data, the embedded demo (local Ray, local S3, digits)."""

import sys

from ctm_dist.train.cli import main

if __name__ == "__main__":
    sys.exit(main("imagenet"))
