"""Evaluate a CTM checkpoint on a shard set: JSON report, PNG plots and TensorBoard (see --help)."""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))  # run from a checkout

from ctm_dist.eval.cli import evaluate_main  # noqa: E402

if __name__ == "__main__":
    sys.exit(evaluate_main())
