"""Train the CTM on Q&A MNIST: `python launch/qamnist.py --help` lists the shared options."""

import sys

from ctm_dist.train.cli import main

if __name__ == "__main__":
    sys.exit(main("qamnist"))
