"""ctm-dist: distributed training for the Continuous Thought Machine."""

__version__ = "0.1.0"


def __getattr__(name):
    # ``ctm_dist.load(path)``: imported on first use so that ``import ctm_dist`` stays light.
    if name == "load":
        from ctm_dist.eval.loading import load

        return load
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
