"""Export a run's ZeRO checkpoint to safetensors + JSON config, or to the reference's format."""

import sys

from ctm_dist.eval.cli import export_main

if __name__ == "__main__":
    sys.exit(export_main())
