"""Run a CTM on image files: prints the class, the tick it stopped at and its certainty."""

import sys

from ctm_dist.eval.cli import predict_main

if __name__ == "__main__":
    sys.exit(predict_main())
