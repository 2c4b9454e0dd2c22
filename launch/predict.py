"""Run a CTM on image files: prints the class, the tick it stopped at and its certainty."""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))  # run from a checkout

from ctm_dist.eval.cli import predict_main  # noqa: E402

if __name__ == "__main__":
    sys.exit(predict_main())
