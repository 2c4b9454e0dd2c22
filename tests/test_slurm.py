"""The Slurm batch script on a real single-node Slurm cluster (clusters/slurm/local-cluster.sh).

One job trains to completion; another is preempted with SIGUSR1, checkpoints, requeues
itself and resumes where it stopped.
"""

import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from cluster_fixtures import REPO, ShortTempDir, free_ports

pytestmark = pytest.mark.slurm

LOCAL_CLUSTER = REPO / "clusters" / "slurm" / "local-cluster.sh"
SBATCH_SCRIPT = REPO / "clusters" / "slurm" / "ray-job.sbatch"
STANDIN = REPO / "tests" / "preemptible_standin.py"


def _cannot_run_reason() -> str | None:
    if os.geteuid() != 0:
        return "the local Slurm cluster needs root"
    missing = [c for c in ("slurmctld", "slurmd", "sbatch", "munged") if shutil.which(c) is None]
    if missing and shutil.which("apt-get") is None:
        return f"Slurm is not installed ({', '.join(missing)} missing) and apt-get is unavailable"
    if missing:
        return f"Slurm is not installed ({', '.join(missing)} missing): run `bash .ci/install --test`"
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
        job_id = self.run(
            "sbatch", "--parsable", "--nodes=1", f"--output={log}", f"--chdir={REPO}",
            *sbatch_options, str(SBATCH_SCRIPT), *args,
        ).strip().split(";")[0]
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
                raise AssertionError(f"job {job_id} stuck in {info.get('JobState')}:\n{self.logs(log)}")
            time.sleep(0.5)


@pytest.fixture(scope="module")
def slurm():
    reason = _cannot_run_reason()
    if reason:
        pytest.skip(reason)
    state = ShortTempDir("ctm-slurm-")
    ctld_port, slurmd_port, ray_port, agent_port, client_port = free_ports(5)
    env = dict(os.environ)
    env.update(
        CTM_SLURM_DIR=str(state.path),
        CTM_SLURMCTLD_PORT=str(ctld_port),
        CTM_SLURMD_PORT=str(slurmd_port),
        SLURM_CONF=str(state.path / "slurm.conf"),
        # The sbatch script's settings for a one-node cluster on 127.0.0.1:
        RAY_AUTH_MODE="disabled",
        CTM_RAY_HEAD_IP="127.0.0.1",
        CTM_RAY_PORT=str(ray_port),
        CTM_RAY_AGENT_PORT=str(agent_port),
        CTM_RAY_CLIENT_PORT=str(client_port),
        CTM_RAY_DASHBOARD="0",
        CTM_RAY_TEMP_DIR=str(state.path / "ray"),
    )
    env.pop("RAY_ADDRESS", None)
    subprocess.run(["bash", str(LOCAL_CLUSTER), "up"], env=env, check=True, timeout=120)
    try:
        jobs = state.path / "jobs"
        jobs.mkdir()
        yield Slurm(env, jobs)
    finally:
        subprocess.run(["bash", str(LOCAL_CLUSTER), "down"], env=env, timeout=120)
        state.cleanup()


def finished(info: dict[str, str]) -> bool:
    return info["JobState"] in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY")


def test_job_trains_to_completion(slurm, tmp_path):
    job_id, log = slurm.sbatch(str(STANDIN), "--storage", str(tmp_path), "--max-steps", "3")
    info = slurm.wait(job_id, finished, 180, log)
    text = log.read_text()
    assert (info["JobState"], info["ExitCode"]) == ("COMPLETED", "0:0"), slurm.logs(log)
    assert "Ray cluster ready: 1 node(s)" in text
    # Without --name the run is named after the job, so a requeue would find it again.
    assert (tmp_path / f"ctm-slurm-{job_id}" / "step").read_text() == "3"
    assert "stopping Ray" in text


def test_preempted_job_requeues_and_resumes(slurm, tmp_path):
    run_dir = tmp_path / "preempted"
    job_id, log = slurm.sbatch(str(STANDIN), "--storage", str(tmp_path), "--name", "preempted",
                               "--max-steps", "12")
    step_file = run_dir / "step"
    deadline = time.monotonic() + 120
    while not step_file.exists():
        assert time.monotonic() < deadline, log.read_text() if log.exists() else "no output"
        time.sleep(0.2)

    slurm.run("scancel", "--batch", "--signal=USR1", job_id)
    info = slurm.wait(job_id, lambda i: i["JobState"] == "PENDING" or finished(i), 60, log)
    assert info["JobState"] == "PENDING" and info["Restarts"] == "1", log.read_text()
    checkpointed = int(step_file.read_text())
    assert 1 <= checkpointed < 12
    # A requeued job waits ~2 min (BeginTime); start it now, once slurmd has finished the
    # old batch step. slurmd revoked the job's credentials at the kill, with one-second
    # resolution: a launch within that second is refused as "already killed".
    deadline = time.monotonic() + 60
    while slurm.run("sinfo", "-h", "-n", "localhost", "-o", "%T").strip() != "idle":
        assert time.monotonic() < deadline, "the node did not become idle after the requeue"
        time.sleep(0.2)
    time.sleep(2)
    slurm.run("scontrol", "update", f"JobId={job_id}", "StartTime=now")

    info = slurm.wait(job_id, finished, 180, log)
    text = log.read_text()
    assert (info["JobState"], info["ExitCode"], info["Restarts"]) == ("COMPLETED", "0:0", "1"), slurm.logs(log)
    first, second = text.split("restart 1:", 1)
    assert "forwarding SIGUSR1 to the launcher" in first
    assert "launcher exited with status 75" in first
    assert f"preempted at step {checkpointed}" in first
    assert f"resumed from step {checkpointed}" in second
    assert step_file.read_text() == "12"
    print(text)
