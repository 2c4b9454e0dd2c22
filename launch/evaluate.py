"""Evaluate a CTM checkpoint on a shard set: JSON report, PNG plots and TensorBoard (see --help)."""

import sys

from ctm_dist.eval.cli import evaluate_main

if __name__ == "__main__":
    sys.exit(evaluate_main())
