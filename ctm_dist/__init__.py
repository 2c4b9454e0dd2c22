"""ctm-dist: distributed training for the Continuous Thought Machine."""

__version__ = "0.1.0"
