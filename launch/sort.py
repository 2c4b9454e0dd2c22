"""Train the CTM to sort real numbers: `python launch/sort.py --help` lists the shared options."""

import sys

from ctm_dist.train.cli import main

if __name__ == "__main__":
    sys.exit(main("sort"))
