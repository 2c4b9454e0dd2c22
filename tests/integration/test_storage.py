"""Location and LocalObjectStore against a real local SeaweedFS server with keys enforced."""

from __future__ import annotations

import json
import os
import pickle
import socket
import ssl
import stat
import subprocess
import sys
import urllib.error
import urllib.request

import grpc
import pytest

from ctm_dist.storage import Location, StorageAccessDenied, StorageError, StorageNotFound
from ctm_dist.storage.local import free_ports


def test_s3_round_trip_put_get_list(s3_location, tmp_path):
    loc = s3_location
    with loc.open("a/one.bin", "wb") as f:
        f.write(b"\x00\x01payload")
    src = tmp_path / "two.txt"
    src.write_bytes(b"second file")
    loc.put_file(src, "a/two.txt")
    loc.write_bytes("top.json", b"{}")

    assert loc.list() == ["a", "top.json"]
    assert loc.list("a") == ["one.bin", "two.txt"]
    assert loc.exists("a/one.bin") and not loc.exists("a/missing.bin")
    with loc.open("a/one.bin") as f:
        assert f.read() == b"\x00\x01payload"
    assert loc.child("a").read_bytes("two.txt") == b"second file"
    dst = tmp_path / "back.txt"
    loc.get_file("a/two.txt", dst)
    assert dst.read_bytes() == b"second file"
    out = tmp_path / "tree"
    loc.get_dir("a", out)
    assert sorted(os.listdir(out)) == ["one.bin", "two.txt"]


def test_env_variables_configure_location(object_store, s3_bucket, s3_env):
    loc = Location.parse(f"s3://{s3_bucket}/p")
    assert loc.endpoint_url == object_store.endpoint_url
    loc.write_bytes("x", b"1")
    assert loc.read_bytes("x") == b"1"


def test_wrong_secret_fails_clearly_without_leaking(object_store, s3_bucket):
    good = Location.parse(
        f"s3://{s3_bucket}/p",
        endpoint_url=object_store.endpoint_url,
        key=object_store.access_key,
        secret=object_store.secret_key,
    )
    good.write_bytes("obj", b"data")
    wrong = "WRONG-secret-" + object_store.secret_key[::-1]
    bad = Location.parse(
        f"s3://{s3_bucket}/p",
        endpoint_url=object_store.endpoint_url,
        key=object_store.access_key,
        secret=wrong,
    )
    for action in (
        lambda: bad.read_bytes("obj"),
        lambda: bad.list(),
        lambda: bad.write_bytes("new", b"x"),
        lambda: bad.open("obj").read(),
    ):
        with pytest.raises(StorageAccessDenied) as info:
            action()
        msg = str(info.value)
        assert f"s3://{s3_bucket}/p" in msg and "access denied" in msg
        assert "AWS_SECRET_ACCESS_KEY" in msg
        assert wrong not in msg and object_store.secret_key not in msg
        assert wrong not in repr(info.value)
    assert wrong not in repr(bad) and wrong not in str(bad) and wrong not in bad.url


def test_anonymous_and_unknown_key_are_refused(object_store, s3_bucket):
    unknown = Location.parse(
        f"s3://{s3_bucket}",
        endpoint_url=object_store.endpoint_url,
        key="nobody",
        secret="whatever-secret",
    )
    with pytest.raises(StorageAccessDenied):
        unknown.write_bytes("x", b"1")
    import botocore

    client = object_store.client()
    client.meta.events.register("choose-signer.s3.*", botocore.handlers.disable_signing)
    with pytest.raises(botocore.exceptions.ClientError) as info:
        client.put_object(Bucket=s3_bucket, Key="anon", Body=b"1")
    assert info.value.response["Error"]["Code"] == "AccessDenied"


def test_missing_bucket_fails_clearly(object_store):
    loc = Location.parse(
        "s3://no-such-bucket-here/p",
        endpoint_url=object_store.endpoint_url,
        key=object_store.access_key,
        secret=object_store.secret_key,
    )
    for action in (
        lambda: loc.read_bytes("x"),
        lambda: loc.list(),
        lambda: loc.write_bytes("x", b"1"),
        loc.check,
    ):
        with pytest.raises(
            StorageNotFound, match=r"s3://no-such-bucket-here/p.*bucket does not exist"
        ):
            action()


def test_missing_object_is_not_found(s3_location):
    with pytest.raises(StorageNotFound, match="not found"):
        s3_location.read_bytes("nothing/here.tar")


def test_unreachable_endpoint_fails_after_deadline():
    loc = Location.parse(
        "s3://bkt/p",
        endpoint_url="http://127.0.0.1:9",
        key="k",
        secret="very-secret-value",
        retry_deadline=0.5,
    )
    with pytest.raises(StorageError, match="unreachable") as info:
        loc.read_bytes("x")
    assert "very-secret-value" not in str(info.value)


def test_to_dict_carries_credentials_but_repr_does_not(object_store, s3_bucket):
    loc = Location.parse(
        f"s3://{s3_bucket}/p",
        endpoint_url=object_store.endpoint_url,
        key=object_store.access_key,
        secret=object_store.secret_key,
    )
    loc.write_bytes("x", b"42")
    again = Location.from_dict(loc.to_dict())
    assert again.read_bytes("x") == b"42"
    unpickled = pickle.loads(pickle.dumps(loc))
    assert unpickled.read_bytes("x") == b"42"
    for text in (repr(loc), str(loc), loc.url, repr(loc.child("a")), repr(loc.to_dict().keys())):
        assert object_store.secret_key not in text


def test_local_paths(tmp_path):
    for url in (str(tmp_path / "d"), f"file://{tmp_path}/d"):
        loc = Location.parse(url)
        assert loc.protocol == "file" and loc.path == str(tmp_path / "d")
        loc.write_bytes("sub/x.txt", b"abc")
        assert loc.list() == ["sub"] and loc.child("sub").list() == ["x.txt"]
        with loc.open("sub/x.txt") as f:
            assert f.read() == b"abc"
    with pytest.raises(StorageNotFound):
        Location.parse(tmp_path).read_bytes("nope")


def test_unknown_scheme_and_gs_without_gcsfs():
    with pytest.raises(StorageError, match="unsupported URL scheme"):
        Location.parse("ftp://host/x")
    try:
        import gcsfs  # noqa: F401
    except ImportError:
        with pytest.raises(StorageError, match="gcsfs"):
            Location.parse("gs://bucket/x")


def test_server_binds_only_loopback_and_keys_file_private(object_store):
    pid = object_store._proc.pid
    out = subprocess.run(["ss", "-ltnpH"], capture_output=True, text=True, check=True).stdout
    ours = [line for line in out.splitlines() if f"pid={pid}," in line]
    assert len(ours) >= 4  # master, volume, filer, s3 (+ gRPC, admin)
    for line in ours:
        local = line.split()[3]
        assert local.startswith("127.0.0.1:"), line
    assert f":{object_store.ports['s3.port']}" in out
    mode = stat.S_IMODE(os.stat(object_store.keys_file).st_mode)
    assert mode == 0o600
    assert object_store.secret_key not in repr(object_store)


def test_cli_serves_prints_endpoint_not_secret_and_stops_cleanly(tmp_path):
    """A second server (the CLI) next to the session's one: own ports, own keys, clean stop."""
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "ctm_dist.storage.local",
            "--dir",
            str(tmp_path),
            "--bucket",
            "cli-bucket",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    lines = []
    try:
        for line in proc.stdout:
            lines.append(line)
            if line.startswith("Ctrl-C"):
                break
        text = "".join(lines)
        endpoint = text.split("S3 endpoint: ")[1].split()[0]
        key = text.split("access key id: ")[1].split()[0]
        import json

        ident = json.loads((tmp_path / "s3-identities.json").read_text())["identities"][0]
        secret = ident["credentials"][0]["secretKey"]
        loc = Location.parse("s3://cli-bucket", endpoint_url=endpoint, key=key, secret=secret)
        loc.write_bytes("k", b"v")
        assert loc.read_bytes("k") == b"v"
    finally:
        proc.terminate()
        proc.wait(30)
    assert endpoint.startswith("http://127.0.0.1:")
    assert "s3-identities.json" in text and "Warning" not in text
    assert secret not in text
    assert proc.returncode == 0
    port = endpoint.rsplit(":", 1)[1]
    out = subprocess.run(["ss", "-ltnH"], capture_output=True, text=True).stdout
    assert f"127.0.0.1:{port} " not in out


def test_restart_keeps_endpoint_and_data(object_store, s3_location):
    s3_location.write_bytes("kept", b"before restart")
    endpoint = object_store.endpoint_url
    object_store.restart()
    assert object_store.endpoint_url == endpoint
    assert s3_location.read_bytes("kept") == b"before restart"  # same client, reconnected


def test_restart_draws_new_internal_ports_when_one_was_taken_meanwhile(object_store, s3_location):
    """Another process binding an internal port during an outage must not keep the store down."""
    s3_location.write_bytes("kept", b"before restart")
    endpoint, taken = object_store.endpoint_url, object_store.ports["volume.port"]
    object_store.stop()
    squatter = socket.socket()
    squatter.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        squatter.bind(("127.0.0.1", taken))
        squatter.listen()
        object_store.restart()
    finally:
        squatter.close()
    assert object_store.endpoint_url == endpoint
    assert object_store.ports["volume.port"] != taken
    assert s3_location.read_bytes("kept") == b"before restart"


def test_ports_are_drawn_below_the_ephemeral_range():
    low = int(open("/proc/sys/net/ipv4/ip_local_port_range").read().split()[0])
    ports = free_ports(40)
    assert len(set(ports)) == 40
    if low >= 21000:
        assert all(20000 <= p < low for p in ports)


def _http(method: str, url: str, body: bytes | None = None, context: ssl.SSLContext | None = None):
    """The status code, or the exception that stopped the request (e.g. a refused TLS handshake)."""
    try:
        with urllib.request.urlopen(
            urllib.request.Request(url, data=body, method=method), timeout=10, context=context
        ) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code
    except (urllib.error.URLError, OSError) as e:
        return e


def _grpc_answer(port: int, credentials=None) -> grpc.StatusCode:
    """How a gRPC port answers a call of a method no server has: UNIMPLEMENTED means it took the call."""
    target = f"127.0.0.1:{port}"
    channel = (
        grpc.secure_channel(target, credentials) if credentials else grpc.insecure_channel(target)
    )
    with channel:
        try:
            channel.unary_unary("/ctm.Probe/Nothing")(b"", timeout=5)
        except grpc.RpcError as e:
            return e.code()
    return grpc.StatusCode.OK


def test_only_the_s3_port_answers_without_keys(object_store, s3_bucket):
    """Master, volume and filer ports (HTTP and gRPC) want the store's client certificate; the
    filer and volume HTTP ports a signed JWT on top. S3 with the keys works."""
    client = object_store.client()
    client.put_object(Bucket=s3_bucket, Key="guarded/COMMIT", Body=b"real")
    port = object_store.ports
    filer = f"127.0.0.1:{port['filer.port']}/buckets/{s3_bucket}/guarded"
    master = f"127.0.0.1:{port['master.port']}"
    requests = [
        ("GET", f"{filer}/COMMIT", None),
        ("GET", f"{filer}/", None),
        ("PUT", f"{filer}/COMMIT", b"forged"),
        ("DELETE", f"{filer}/?recursive=true", None),
        ("GET", f"{master}/dir/assign", None),
        ("GET", f"{master}/col/delete?collection={s3_bucket}", None),
        ("GET", f"127.0.0.1:{port['volume.port']}/status", None),
    ]
    grpc_ports = (
        "master.port.grpc",
        "volume.port.grpc",
        "filer.port.grpc",
        "s3.port.grpc",
        "admin.port.grpc",
    )
    for method, url, body in requests:
        answer = _http(method, f"http://{url}", body)
        assert not (isinstance(answer, int) and answer < 300), (method, url, answer)
    for name in grpc_ports:
        assert _grpc_answer(port[name]) == grpc.StatusCode.UNAVAILABLE, name

    tls = object_store.data_dir / "tls"
    trusting = ssl.create_default_context(
        cafile=str(tls / "ca.crt")
    )  # trusts the server, has no certificate
    with_cert = ssl.create_default_context(cafile=str(tls / "ca.crt"))
    with_cert.load_cert_chain(str(tls / "node.crt"), str(tls / "node.key"))
    for method, url, body in requests:
        answer = _http(method, f"https://{url}", body, trusting)
        assert not (isinstance(answer, int) and answer < 300), (method, url, answer)
    for name in grpc_ports:
        no_cert = grpc.ssl_channel_credentials(root_certificates=(tls / "ca.crt").read_bytes())
        assert _grpc_answer(port[name], no_cert) == grpc.StatusCode.UNAVAILABLE, name

    # With the certificate but no JWT, the filer and volume servers still refuse.
    for method, url, body in requests[:4]:
        assert _http(method, f"https://{url}", body, with_cert) == 401, (method, url)
    with urllib.request.urlopen(f"https://{master}/dir/assign", timeout=10, context=with_cert) as r:
        assigned = json.loads(r.read())
    volume = f"https://{assigned['url']}/{assigned['fid']}"
    assert _http("POST", volume, b"forged", with_cert) == 401
    assert _http("GET", volume, None, with_cert) == 401

    assert client.get_object(Bucket=s3_bucket, Key="guarded/COMMIT")["Body"].read() == b"real"
    for private in (object_store.security_file, tls / "node.key"):
        assert stat.S_IMODE(os.stat(private).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(object_store.data_dir).st_mode) == 0o700
