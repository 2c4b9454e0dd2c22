"""`ray job submit` of a launcher to a running Ray cluster (a local head with the dashboard).

The job uploads this checkout as its working_dir, gets the S3 endpoint and the path of a 0600
AWS shared-credentials file through its runtime_env (clusters/ray/runtime_env.py), and trains a
tiny parity CTM into the local S3 server; the run's committed checkpoints and TensorBoard events
must be there afterwards, and the secret key nowhere in Ray's session files, the dashboard's job
list or the Ray processes' command lines and environments.
"""

import json
import os
import stat
import subprocess
import sys
import time
import uuid
import zipfile

from cluster_fixtures import REPO, TINY_LAUNCH, LocalRayHead, files_holding, load_script

from ctm_dist.storage import Location
from ctm_dist.storage.checkpoints import committed_steps

job_runtime_env = load_script("clusters/ray/runtime_env.py")

UPLOAD_CAP = 100 * 2**20  # ray job submit's working_dir limit
TINY_PARITY = [*TINY_LAUNCH, "--max-steps", "4", "--checkpoint-every", "2", "eval.every=0"]


def test_working_dir_package_is_small_and_leaves_out_history(tmp_path):
    from ray._private.runtime_env.packaging import create_package

    env = job_runtime_env.runtime_env(with_credentials=False)
    package = tmp_path / "working_dir.zip"
    create_package(str(REPO), package, include_gitignore=True, excludes=env["excludes"])
    size = package.stat().st_size
    assert size < UPLOAD_CAP // 4, f"working_dir package is {size / 2**20:.1f} MiB"
    names = zipfile.ZipFile(package).namelist()
    assert "launch/parity.py" in names and "ctm_dist/train/driver.py" in names
    assert "ctm_dist/data/index.py" in names  # code under a folder named like a data folder
    assert not [n for n in names if n.startswith((".git/", "tests/", ".ctm-dist/", "runs/"))]


def test_runtime_env_never_carries_the_keys(tmp_path):
    environ = {
        "AWS_ACCESS_KEY_ID": "AKIAEXAMPLE",
        "AWS_SECRET_ACCESS_KEY": "s3cr3t-canary",
        "AWS_SESSION_TOKEN": "t0ken-canary",
        "AWS_ENDPOINT_URL": "http://127.0.0.1:9000",
        "HOME": "/root",
        "AWS_REGION": "",
    }
    env = job_runtime_env.runtime_env(True, environ)
    assert env["env_vars"] == {"AWS_ENDPOINT_URL": "http://127.0.0.1:9000"}
    assert "env_vars" not in job_runtime_env.runtime_env(False, environ)

    creds = tmp_path / "creds" / "s3-credentials"
    env = job_runtime_env.runtime_env(True, environ, credentials_file=creds)
    assert env["env_vars"] == {
        "AWS_ENDPOINT_URL": "http://127.0.0.1:9000",
        "AWS_SHARED_CREDENTIALS_FILE": str(creds),
    }
    assert "canary" not in json.dumps(env)
    assert stat.S_IMODE(creds.stat().st_mode) == 0o600
    import configparser

    profile = configparser.ConfigParser()
    profile.read(creds)
    assert dict(profile["default"]) == {
        "aws_access_key_id": "AKIAEXAMPLE",
        "aws_secret_access_key": "s3cr3t-canary",
        "aws_session_token": "t0ken-canary",
    }
    # Without keys in the shell, the file must already be there, for its owner only.
    without_keys = {"AWS_ENDPOINT_URL": "http://127.0.0.1:9000"}
    assert (
        job_runtime_env.runtime_env(True, without_keys, credentials_file=creds)["env_vars"]
        == env["env_vars"]
    )
    creds.chmod(0o644)
    for make_env in (
        lambda: job_runtime_env.runtime_env(True, without_keys, credentials_file=creds),
        lambda: job_runtime_env.runtime_env(True, {"AWS_SHARED_CREDENTIALS_FILE": str(creds)}),
    ):
        try:
            make_env()
        except job_runtime_env.CredentialsError as e:
            assert "chmod 600" in str(e)
        else:
            raise AssertionError("a credentials file readable by others was accepted")


def _process_texts() -> dict[str, bytes]:
    """Every process' command line (ps) and, where readable, environment."""
    texts = {"ps": subprocess.run(["ps", "-eo", "args"], capture_output=True, check=True).stdout}
    for proc in os.listdir("/proc"):
        if proc.isdigit():
            try:
                texts[f"/proc/{proc}/environ"] = open(f"/proc/{proc}/environ", "rb").read()
            except OSError:
                pass
    return texts


def test_ray_job_submit_trains_into_object_storage(object_store, s3_bucket, tmp_path):
    from ray.job_submission import JobStatus, JobSubmissionClient

    storage = f"s3://{s3_bucket}/runs"
    submission_id = f"ctm-test-{uuid.uuid4().hex[:8]}"
    secret = object_store.secret_key.encode()
    creds = tmp_path / "s3-credentials"
    with LocalRayHead(num_cpus=2) as head:
        shell = dict(head.env, **object_store.env())  # the submitting shell has the S3 keys
        runtime_env = subprocess.run(
            [
                sys.executable,
                str(REPO / "clusters" / "ray" / "runtime_env.py"),
                "--credentials-file",
                str(creds),
            ],
            env=shell,
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        assert object_store.secret_key not in runtime_env
        assert stat.S_IMODE(creds.stat().st_mode) == 0o600
        submit = subprocess.run(
            [
                "ray",
                "job",
                "submit",
                "--address",
                head.dashboard_url,
                "--submission-id",
                submission_id,
                "--no-wait",
                "--working-dir",
                ".",
                "--runtime-env-json",
                runtime_env,
                "--",
                "python",
                "launch/parity.py",
                "--storage",
                storage,
                "--name",
                "submitted",
                *TINY_PARITY,
            ],
            cwd=REPO,
            env=shell,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert submit.returncode == 0, submit.stdout + submit.stderr

        client = JobSubmissionClient(head.dashboard_url)
        deadline = time.monotonic() + 240
        leaks = []
        while not (status := client.get_job_status(submission_id)).is_terminal():
            assert time.monotonic() < deadline, client.get_job_logs(submission_id)[-5000:]
            # While the job's driver and workers run: their command lines and environments.
            leaks += [where for where, text in _process_texts().items() if secret in text]
            time.sleep(1)
        logs = client.get_job_logs(submission_id)
        assert status == JobStatus.SUCCEEDED, logs[-5000:]
        info = client.get_job_info(submission_id)
        jobs = client.list_jobs()
        leaks += files_holding(
            head.temp.path, secret
        )  # every node's logs, runtime_env, spilled objects
        leaks += [where for where, text in _process_texts().items() if secret in text]
        leaks += ["list_jobs"] * (object_store.secret_key in repr(jobs))
        leaks += ["get_job_info"] * (object_store.secret_key in repr(info))
        leaks += ["job logs"] * (object_store.secret_key in logs)
    assert not leaks, f"the secret key is in: {sorted(set(leaks))}"

    assert "run submitted: 4 steps" in logs
    run = Location.parse(
        f"{storage}/submitted",
        endpoint_url=object_store.endpoint_url,
        key=object_store.access_key,
        secret=object_store.secret_key,
    )
    assert committed_steps(run.child("checkpoints"))[-1] == 4
    events = [n for n in run.child("tensorboard").list() if "tfevents" in n]
    assert events, "no TensorBoard events in the run's storage"
    assert info.runtime_env["env_vars"]["AWS_SHARED_CREDENTIALS_FILE"] == str(creds)
