"""Helpers shared by the cluster tests: free ports, short temp dirs, the Ray environment."""

import os
import shutil
import socket
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def free_ports(n: int) -> list[int]:
    """n distinct TCP ports that are free on 127.0.0.1 right now."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


class ShortTempDir:
    """A temp dir directly under /tmp: Ray's socket paths must stay under 107 characters."""

    def __init__(self, prefix: str):
        self.path = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))

    def cleanup(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)


def ray_client_env() -> dict[str, str]:
    """The environment for Ray commands in tests: auth mode explicit, no usage stats."""
    env = dict(os.environ)
    env["RAY_AUTH_MODE"] = env.get("RAY_AUTH_MODE", "disabled")
    env["RAY_USAGE_STATS_ENABLED"] = "0"
    env["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # single node on 127.0.0.1
    env.pop("RAY_ADDRESS", None)
    return env
