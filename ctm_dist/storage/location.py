"""``Location``: one URL plus credentials, turned into an fsspec filesystem and a root path.

Supported: ``s3://bucket/prefix``, ``gs://bucket/prefix`` (needs gcsfs), ``file:///path``
and plain paths. Endpoint and keys come from explicit arguments, else the standard
``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_REGION``
(or ``AWS_DEFAULT_REGION``) variables. ``repr()``, ``str()``, ``url`` and every error
message leave the secret out; ``to_dict()`` carries it for in-memory hand-over to
workers (do not write that dict to disk).
"""

from __future__ import annotations

import os
import posixpath
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any, TypeVar

from .errors import StorageError
from .retry import DEFAULT_DEADLINE, call_with_retry, translate_error

T = TypeVar("T")


def _env(*names: str) -> str | None:
    for name in names:
        value = os.environ.get(name)
        if value:
            return value
    return None


@dataclass
class Location:
    protocol: str  # "s3", "gs" or "file"
    path: str  # root inside the filesystem: "bucket/prefix" or "/abs/dir"
    endpoint_url: str | None = None
    key: str | None = None
    secret: str | None = field(default=None, repr=False)
    region: str | None = None
    retry_deadline: float = DEFAULT_DEADLINE
    _fs: Any = field(default=None, repr=False, compare=False)

    # ------------------------------------------------------------------ construction
    @classmethod
    def parse(
        cls,
        url: str | os.PathLike | Location,
        endpoint_url: str | None = None,
        key: str | None = None,
        secret: str | None = None,
        region: str | None = None,
        retry_deadline: float | None = None,
    ) -> Location:
        if isinstance(url, Location):
            return url
        url = os.fspath(url)
        deadline = DEFAULT_DEADLINE if retry_deadline is None else retry_deadline
        if url.startswith("s3://") or url.startswith("s3a://"):
            path = url.split("://", 1)[1].strip("/")
            if not path:
                raise StorageError(f"{url}: no bucket in the URL")
            return cls(
                "s3",
                path,
                endpoint_url=endpoint_url or _env("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL"),
                key=key or _env("AWS_ACCESS_KEY_ID"),
                secret=secret or _env("AWS_SECRET_ACCESS_KEY"),
                region=region or _env("AWS_REGION", "AWS_DEFAULT_REGION"),
                retry_deadline=deadline,
            )
        if url.startswith("gs://") or url.startswith("gcs://"):
            try:
                import gcsfs  # noqa: F401
            except ImportError:
                raise StorageError(
                    f"{url}: gs:// needs the gcsfs package (pip install gcsfs)"
                ) from None
            path = url.split("://", 1)[1].strip("/")
            return cls("gs", path, retry_deadline=deadline)
        if url.startswith("file://"):
            url = url[len("file://") :]
        elif "://" in url:
            raise StorageError(
                f"{url}: unsupported URL scheme (use s3://, gs://, file:// or a path)"
            )
        return cls("file", os.path.abspath(os.path.expanduser(url)), retry_deadline=deadline)

    def to_dict(self) -> dict[str, Any]:
        """Everything needed to rebuild this Location elsewhere, credentials included.

        Meant for in-memory hand-over (e.g. to Ray workers); never write it to disk.
        """
        return {
            "protocol": self.protocol,
            "path": self.path,
            "endpoint_url": self.endpoint_url,
            "key": self.key,
            "secret": self.secret,
            "region": self.region,
            "retry_deadline": self.retry_deadline,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Location:
        return cls(
            **{
                k: d.get(k) for k in ("protocol", "path", "endpoint_url", "key", "secret", "region")
            },
            retry_deadline=d.get("retry_deadline", DEFAULT_DEADLINE),
        )

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_fs"] = None  # rebuilt lazily on the other side
        return state

    # ------------------------------------------------------------------ naming
    @property
    def url(self) -> str:
        """The URL without any credentials."""
        if self.protocol == "file":
            return "file://" + self.path
        return f"{self.protocol}://{self.path}"

    def __str__(self) -> str:
        return self.url

    def __repr__(self) -> str:
        extra = f", endpoint_url={self.endpoint_url!r}" if self.endpoint_url else ""
        return f"Location({self.url!r}{extra})"

    def join(self, name: str = "") -> str:
        """The filesystem path of ``name`` relative to this location."""
        name = name.strip("/")
        return posixpath.join(self.path, name) if name else self.path

    def child(self, name: str) -> Location:
        return replace(self, path=self.join(name), _fs=self._fs)

    def name_url(self, name: str) -> str:
        return self.child(name).url

    # ------------------------------------------------------------------ filesystem
    @property
    def fs(self):
        if self._fs is None:
            self._fs = self._make_fs()
        return self._fs

    def _make_fs(self):
        if self.protocol == "file":
            from fsspec.implementations.local import LocalFileSystem

            return LocalFileSystem(auto_mkdir=True)
        if self.protocol == "s3":
            import s3fs

            client_kwargs: dict[str, Any] = {"region_name": self.region or "us-east-1"}
            if self.endpoint_url:
                client_kwargs["endpoint_url"] = self.endpoint_url
            fs = s3fs.S3FileSystem(
                key=self.key,
                secret=self.secret,
                client_kwargs=client_kwargs,
                config_kwargs={
                    "retries": {"max_attempts": 2, "mode": "standard"},
                    "connect_timeout": 5,
                    "read_timeout": 60,
                },
                skip_instance_cache=True,
            )
            # Few quick inner retries; the outer loop (self.call) owns the deadline.
            fs.retries = 3
            return fs
        if self.protocol == "gs":
            import gcsfs

            return gcsfs.GCSFileSystem()
        raise StorageError(f"unknown protocol {self.protocol!r}")

    def call(self, fn: Callable[[], T], what: str) -> T:
        """Run ``fn`` retrying transient errors until the deadline; clear errors otherwise."""
        return call_with_retry(
            fn,
            self.name_url(what) if what else self.url,
            deadline=self.retry_deadline,
            secrets=self._secrets(),
        )

    def _secrets(self) -> tuple[str, ...]:
        return tuple(s for s in (self.secret,) if s)

    def open(self, name: str, mode: str = "rb", **kwargs):
        """Open ``name`` (relative to this location); opening is retried and errors translated."""
        path = self.join(name)
        if "r" in mode:
            return self.call(lambda: self.fs.open(path, mode, **kwargs), name)
        return _TranslatingWriter(
            self.call(lambda: self.fs.open(path, mode, **kwargs), name),
            self.name_url(name),
            self._secrets(),
        )

    def exists(self, name: str = "") -> bool:
        return self.call(lambda: self.fs.exists(self.join(name)), name)

    def list(self, name: str = "") -> list[str]:
        """Names directly under ``name``, relative to it, sorted."""
        base = self.join(name)
        entries = self.call(
            lambda: (
                self.fs.ls(base, detail=False, refresh=True)
                if self.protocol != "file"
                else self.fs.ls(base, detail=False)
            ),
            name,
        )
        return sorted(posixpath.basename(e.rstrip("/")) for e in entries)

    def read_bytes(self, name: str) -> bytes:
        return self.call(lambda: self.fs.cat_file(self.join(name)), name)

    def write_bytes(self, name: str, data: bytes) -> None:
        """Write a whole object; on local disk via a temporary file and rename (atomic)."""
        if self.protocol == "file":
            path = self.join(name)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            tmp = f"{path}.tmp-{os.getpid()}"
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
            return
        self.call(lambda: self.fs.pipe_file(self.join(name), data), name)

    def put_file(self, local_path: str | os.PathLike, name: str) -> None:
        """Upload a local file (objects appear whole; local copies go via a rename)."""
        if self.protocol == "file":
            path = self.join(name)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            tmp = f"{path}.tmp-{os.getpid()}"
            shutil.copyfile(local_path, tmp)
            os.replace(tmp, path)
            return
        self.call(lambda: self.fs.put_file(os.fspath(local_path), self.join(name)), name)

    def get_file(self, name: str, local_path: str | os.PathLike) -> None:
        self.call(lambda: self.fs.get_file(self.join(name), os.fspath(local_path)), name)

    def put_dir(self, local_dir: str | os.PathLike, name: str = "") -> None:
        """Upload every file under ``local_dir`` to ``name/``."""
        local_dir = os.fspath(local_dir)
        for root, _dirs, files in os.walk(local_dir):
            for f in sorted(files):
                rel = os.path.relpath(os.path.join(root, f), local_dir).replace(os.sep, "/")
                self.put_file(os.path.join(root, f), posixpath.join(name, rel) if name else rel)

    def get_dir(self, name: str, local_dir: str | os.PathLike) -> None:
        """Download every object under ``name/`` into ``local_dir``."""
        base = self.join(name)
        files = self.call(lambda: self.fs.find(base), name)
        for path in files:
            rel = posixpath.relpath(path, base)
            parts = rel.split("/")
            if path.startswith("/") != base.startswith("/") or any(
                p in ("", ".", "..") for p in parts
            ):
                # a store that accepts such keys would otherwise let its writers place files anywhere here
                raise StorageError(
                    f"{self.name_url(name)}: refused the object key {path[:200]!r}: it would "
                    f"be written outside {os.fspath(local_dir)}"
                )
            target = os.path.join(os.fspath(local_dir), *parts)
            os.makedirs(os.path.dirname(target), exist_ok=True)
            self.call(lambda p=path, t=target: self.fs.get_file(p, t), posixpath.join(name, rel))

    def rm(self, name: str, recursive: bool = False) -> None:
        self.call(lambda: self.fs.rm(self.join(name), recursive=recursive), name)

    def check(self) -> None:
        """Fail fast (clear StorageError) if the root cannot be reached with these credentials."""
        if self.protocol == "s3":
            bucket = self.path.split("/", 1)[0]
            self.call(lambda: self.fs.ls(bucket, detail=False, refresh=True), "")


class _TranslatingWriter:
    """Wraps a writable fsspec file so that errors raised at close (where S3 uploads
    happen) come out as clear StorageErrors."""

    def __init__(self, f, url: str, secrets: tuple[str, ...]):
        self._f, self._url, self._secrets = f, url, secrets

    def __getattr__(self, name):
        return getattr(self._f, name)

    def write(self, data):
        try:
            return self._f.write(data)
        except Exception as e:
            raise translate_error(e, self._url, self._secrets) from None

    def close(self):
        try:
            self._f.close()
        except Exception as e:
            raise translate_error(e, self._url, self._secrets) from None

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None:
            try:
                self._f.discard() if hasattr(self._f, "discard") else self._f.close()
            except Exception:
                pass
            return False
        self.close()
        return False
