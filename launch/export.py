"""Export a run's ZeRO checkpoint to safetensors + JSON config, or to the reference's format."""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))  # run from a checkout

from ctm_dist.eval.cli import export_main  # noqa: E402

if __name__ == "__main__":
    sys.exit(export_main())
