"""Storage errors with messages that name the URL and never a secret."""


class StorageError(RuntimeError):
    """A storage operation failed; the message names the location, never credentials."""


class StorageNotFound(StorageError, FileNotFoundError):
    """A bucket, prefix or object does not exist."""


class StorageAccessDenied(StorageError, PermissionError):
    """The credentials were refused."""
