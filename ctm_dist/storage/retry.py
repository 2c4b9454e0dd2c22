"""Retry transient storage errors with backoff; translate the rest into clear messages.

Messages name the URL and the server's error code, never a secret.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Iterable
from typing import TypeVar

from .errors import StorageAccessDenied, StorageError, StorageNotFound

T = TypeVar("T")
DEFAULT_DEADLINE = 60.0

_DENIED_CODES = {
    "AccessDenied",
    "InvalidAccessKeyId",
    "SignatureDoesNotMatch",
    "403",
    "InvalidToken",
    "ExpiredToken",
    "AuthorizationHeaderMalformed",
}
_MISSING_BUCKET_CODES = {"NoSuchBucket"}
_MISSING_CODES = {"NoSuchKey", "404", "NotFound"}
_TRANSIENT_CODES = {
    "SlowDown",
    "ServiceUnavailable",
    "InternalError",
    "RequestTimeout",
    "RequestTimeTooSkewed",
    "500",
    "502",
    "503",
    "504",
    "Throttling",
}
_CREDENTIALS_HINT = "check AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY"


def _error_code(exc: BaseException) -> str | None:
    """The S3 error code carried by ``exc`` or its causes (botocore ClientError)."""
    seen = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        response = getattr(e, "response", None)
        if isinstance(response, dict):
            code = response.get("Error", {}).get("Code")
            if code:
                return str(code)
        e = e.__cause__ or e.__context__
    return None


def _chain(exc: BaseException) -> list[BaseException]:
    out, seen, e = [], set(), exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        out.append(e)
        e = e.__cause__ or e.__context__
    return out


def _is_connection_problem(exc: BaseException) -> bool:
    names = {type(e).__name__ for e in _chain(exc)}
    connection_names = {
        "EndpointConnectionError",
        "ConnectionClosedError",
        "ConnectTimeoutError",
        "ReadTimeoutError",
        "ClientConnectorError",
        "ServerDisconnectedError",
        "ClientOSError",
        "ClientPayloadError",
        "ConnectionError",
        "ConnectionRefusedError",
        "ConnectionResetError",
        "TimeoutError",
        "IncompleteReadError",
        "ResponseStreamingError",
        "ProtocolError",
    }
    return bool(names & connection_names)


def is_transient(exc: BaseException) -> bool:
    """Worth retrying: connection trouble, throttling and server-side 5xx errors."""
    if isinstance(exc, StorageError):
        return False
    code = _error_code(exc)
    if code is not None:
        return code in _TRANSIENT_CODES
    if isinstance(
        exc,
        (
            FileNotFoundError,
            PermissionError,
            IsADirectoryError,
            NotADirectoryError,
            ValueError,
            KeyError,
        ),
    ):
        return False
    return _is_connection_problem(exc)


def _scrub(text: str, secrets: Iterable[str]) -> str:
    for s in secrets:
        if s:
            text = text.replace(s, "***")
    return text


def translate_error(exc: BaseException, url: str, secrets: Iterable[str] = ()) -> StorageError:
    """A StorageError for ``exc`` that names ``url`` and hides ``secrets``."""
    if isinstance(exc, StorageError):
        return exc
    code = _error_code(exc)
    text = " ".join(str(exc).split())
    if code in _DENIED_CODES or (code is None and isinstance(exc, PermissionError)):
        detail = f" [{code}]" if code else ""
        return StorageAccessDenied(f"{url}: access denied{detail} ({_CREDENTIALS_HINT})")
    if (
        code in _MISSING_BUCKET_CODES
        or (code is None and "NoSuchBucket" in text)
        or (code is None and "bucket does not exist" in text.lower())
    ):
        return StorageNotFound(f"{url}: bucket does not exist")
    if code in _MISSING_CODES or (code is None and isinstance(exc, FileNotFoundError)):
        return StorageNotFound(f"{url}: not found")
    if _is_connection_problem(exc):
        return StorageError(
            f"{url}: endpoint unreachable ({type(exc).__name__}); "
            "check AWS_ENDPOINT_URL and that the server is running"
        )
    detail = f"{code}: " if code else f"{type(exc).__name__}: "
    return StorageError(_scrub(f"{url}: {detail}{text}"[:500], secrets))


def call_with_retry(
    fn: Callable[[], T],
    url: str,
    deadline: float = DEFAULT_DEADLINE,
    secrets: Iterable[str] = (),
    base_delay: float = 0.2,
    max_delay: float = 5.0,
) -> T:
    """``fn()``, retried with jittered exponential backoff while errors are transient and
    ``deadline`` seconds have not passed; other errors become clear StorageErrors."""
    secrets = tuple(secrets)
    start = time.monotonic()
    attempt = 0
    while True:
        try:
            return fn()
        except Exception as exc:
            if not is_transient(exc) or time.monotonic() - start >= deadline:
                raise translate_error(exc, url, secrets) from None
            delay = min(max_delay, base_delay * 2**attempt) * (0.5 + random.random())
            delay = min(delay, max(0.0, deadline - (time.monotonic() - start)))
            attempt += 1
            time.sleep(delay)
