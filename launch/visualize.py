"""Pictures of a CTM on a few inputs: certainty/loss, ticks used, attention (PNG+GIF), maze routes, neurons."""

import sys

from ctm_dist.eval.cli import visualize_main

if __name__ == "__main__":
    sys.exit(visualize_main())
