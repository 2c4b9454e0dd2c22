"""Shared fixtures: one real local S3 server (SeaweedFS, keys enforced) per test session."""

from __future__ import annotations

import itertools
import socket
import sys
import uuid

import pytest
import torch
import torch.distributed as dist

from ctm_dist.storage import LocalObjectStore, Location

_bucket_counter = itertools.count()


@pytest.fixture(scope="session")
def object_store(tmp_path_factory):
    """A LocalObjectStore on 127.0.0.1 with generated keys; started once, stopped at the end."""
    with LocalObjectStore(tmp_path_factory.mktemp("s3")) as store:
        yield store


@pytest.fixture
def s3_bucket(object_store) -> str:
    """The name of a fresh, empty bucket on the session's server."""
    name = f"t{next(_bucket_counter)}-{uuid.uuid4().hex[:10]}"
    object_store.create_bucket(name)
    return name


@pytest.fixture
def s3_location(object_store, s3_bucket) -> Location:
    """``s3://<fresh bucket>/data`` with the server's endpoint and keys."""
    return Location.parse(
        f"s3://{s3_bucket}/data",
        endpoint_url=object_store.endpoint_url,
        key=object_store.access_key,
        secret=object_store.secret_key,
        retry_deadline=10,
    )


@pytest.fixture
def s3_env(object_store, monkeypatch) -> dict[str, str]:
    """The server's AWS_* variables set in os.environ for the test (and returned)."""
    env = object_store.env()
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    return env


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models gain nothing from threads, and threads spin badly on a shared 2-core box."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def process_group():
    """A one-process gloo group (rank 0 of 1) for DeepSpeed engines built in this process.

    The group is created once and kept for the rest of the session: DeepSpeed caches the world
    group, so an engine built after a destroy and re-create fails with "group is not registered".
    The rank variables DeepSpeed reads are set for the module only."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {
        "RANK": "0",
        "LOCAL_RANK": "0",
        "WORLD_SIZE": "1",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port),
    }
    with pytest.MonkeyPatch.context() as mp:
        for k, v in env.items():
            mp.setenv(k, v)
        if not dist.is_initialized():
            dist.init_process_group(
                "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1
            )
        yield


def pytest_sessionfinish(session, exitstatus):
    """Stop the native libraries' background threads while the interpreter is still whole.

    The gloo process group above (and ``checkpoint_fixtures.init_dist``'s) is kept for the session,
    and a test that fails mid-way can leave Ray connected; left to interpreter teardown, their
    threads run while the modules they call into are being destroyed."""
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        ray.shutdown()
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
