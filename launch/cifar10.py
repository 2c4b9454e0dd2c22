"""Train the CTM on cifar10: `python launch/cifar10.py --help` lists the shared options."""

import sys

from ctm_dist.train.cli import main

if __name__ == "__main__":
    sys.exit(main("cifar10"))
