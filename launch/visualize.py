"""Pictures of a CTM on a few inputs: certainty/loss, ticks used, attention (PNG+GIF), maze routes, neurons."""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))  # run from a checkout

from ctm_dist.eval.cli import visualize_main  # noqa: E402

if __name__ == "__main__":
    sys.exit(visualize_main())
