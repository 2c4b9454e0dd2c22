"""The one training loop, its components and the Ray driver."""
