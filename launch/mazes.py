"""Train the CTM on mazes: `python launch/mazes.py --help` lists the shared options."""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))  # run from a checkout

from ctm_dist.train.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main("mazes"))
