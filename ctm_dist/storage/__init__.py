"""Where data and checkpoints live: URLs, credentials and a local S3 server."""

from .errors import StorageAccessDenied, StorageError, StorageNotFound
from .location import Location
from .retry import call_with_retry, is_transient, translate_error

__all__ = [
    "Location",
    "LocalObjectStore",
    "StorageError",
    "StorageNotFound",
    "StorageAccessDenied",
    "call_with_retry",
    "is_transient",
    "translate_error",
]


def __getattr__(name):
    # Imported lazily so that `python -m ctm_dist.storage.local` runs it only once.
    if name == "LocalObjectStore":
        from .local import LocalObjectStore

        return LocalObjectStore
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
