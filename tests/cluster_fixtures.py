"""Helpers shared by the cluster tests: free ports, short temp dirs, the Ray environment."""

import importlib.util
import os
import shutil
import sys
import tempfile
from pathlib import Path

from ctm_dist.storage.local import free_ports  # noqa: F401  (re-exported for the cluster tests)

REPO = Path(__file__).resolve().parent.parent

# A CTM whose training step takes milliseconds on a CPU: the trainer's dotted config overrides.
TINY_MODEL = [
    "model.iterations=3",
    "model.d_model=32",
    "model.d_input=16",
    "model.heads=2",
    "model.n_synch_out=16",
    "model.n_synch_action=16",
    "model.memory_length=2",
    "model.memory_hidden_dims=2",
]
# A launcher's (launch/*.py) arguments for that CTM: one worker, fp32, small batches, quiet.
TINY_LAUNCH = [
    "--workers",
    "1",
    "--batch-size",
    "8",
    "--precision",
    "fp32",
    "--quiet",
    "run.log_every=1",
    "eval.batches=1",
    "data.eval_batch_size=8",
    *TINY_MODEL,
]


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


def files_holding(root, secret: bytes) -> list[str]:
    """The files under ``root`` whose bytes contain ``secret``."""
    found = []
    for dirpath, _, names in os.walk(root):
        for name in names:
            path = os.path.join(dirpath, name)
            try:
                with open(path, "rb") as f:
                    if secret in f.read():
                        found.append(path)
            except OSError:  # sockets, files removed meanwhile
                pass
    return found


def load_script(relpath: str):
    """A script of this repository (not part of the package) as a module."""
    name = "ctm_script_" + relpath.replace("/", "_").removesuffix(".py")
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, REPO / relpath)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # dataclasses look their module up while the class is built
        spec.loader.exec_module(module)
    return sys.modules[name]


def load_generator():
    """clusters/kubernetes/generate.py as a module."""
    return load_script("clusters/kubernetes/generate.py")


class LocalRayHead:
    """`ray start --head --block` on 127.0.0.1 with its own ports and temp dir; a context manager.

    Stopped by SIGTERM to that one process (which stops its Ray processes), never `ray stop`,
    which would stop every Ray cluster on the machine.
    """

    def __init__(self, num_cpus: int = 2, start_timeout: float = 120.0):
        self.num_cpus = num_cpus
        self.start_timeout = start_timeout
        self.port, self.dashboard_port, self.agent_port, self.client_port = free_ports(4)
        self.temp = ShortTempDir("ctmray-")
        self.env = ray_client_env()
        self.proc = None

    @property
    def dashboard_url(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    def __enter__(self) -> "LocalRayHead":
        import subprocess
        import time
        import urllib.request

        cmd = [
            "ray",
            "start",
            "--head",
            "--block",
            "--node-ip-address=127.0.0.1",
            f"--port={self.port}",
            f"--num-cpus={self.num_cpus}",
            "--disable-usage-stats",
            f"--temp-dir={self.temp.path}",
            "--include-dashboard=true",
            "--dashboard-host=127.0.0.1",
            f"--dashboard-port={self.dashboard_port}",
            f"--dashboard-agent-listen-port={self.agent_port}",
            f"--ray-client-server-port={self.client_port}",
        ]
        self.log = open(self.temp.path / "ray-start.log", "w")
        self.proc = subprocess.Popen(
            cmd, env=self.env, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True
        )
        deadline = time.monotonic() + self.start_timeout
        while True:
            try:
                with urllib.request.urlopen(f"{self.dashboard_url}/api/version", timeout=2):
                    return self
            except OSError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                log = (self.temp.path / "ray-start.log").read_text()  # before __exit__ removes it
                self.__exit__()
                raise RuntimeError("the Ray head did not start:\n" + log)
            time.sleep(0.5)

    def __exit__(self, *exc) -> None:
        import signal
        import subprocess

        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                pass
            try:  # anything left in its session
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait(timeout=10)
        self.log.close()
        self.temp.cleanup()
