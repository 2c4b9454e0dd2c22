"""`ray job submit` of a launcher to a running Ray cluster (a local head with the dashboard).

The job uploads this checkout as its working_dir, gets the S3 keys through its runtime_env
(clusters/ray/runtime_env.py) and trains a tiny parity CTM into the local S3 server; the run's
committed checkpoints and TensorBoard events must be there afterwards.
"""

import json
import subprocess
import sys
import time
import uuid
import zipfile

from cluster_fixtures import REPO, LocalRayHead, load_script

from ctm_dist.storage import Location

job_runtime_env = load_script("clusters/ray/runtime_env.py")

UPLOAD_CAP = 100 * 2**20  # ray job submit's working_dir limit
TINY_PARITY = ["--workers", "1", "--max-steps", "4", "--checkpoint-every", "2", "--batch-size", "8",
               "--precision", "fp32", "--quiet", "run.log_every=1", "eval.every=0", "eval.batches=1",
               "data.eval_batch_size=8", "model.iterations=3", "model.d_model=32", "model.d_input=16",
               "model.heads=2", "model.n_synch_out=16", "model.n_synch_action=16", "model.memory_length=2",
               "model.memory_hidden_dims=2"]


def test_working_dir_package_is_small_and_leaves_out_history(tmp_path):
    from ray._private.runtime_env.packaging import create_package

    env = job_runtime_env.runtime_env(with_credentials=False)
    package = tmp_path / "working_dir.zip"
    create_package(str(REPO), package, include_gitignore=True, excludes=env["excludes"])
    size = package.stat().st_size
    assert size < UPLOAD_CAP // 4, f"working_dir package is {size / 2**20:.1f} MiB"
    names = zipfile.ZipFile(package).namelist()
    assert "launch/parity.py" in names and "ctm_dist/train/driver.py" in names
    assert not [n for n in names if n.startswith((".git/", "tests/", ".ctm-dist/", "runs/"))]


def test_runtime_env_carries_s3_settings_only_when_asked():
    environ = {"AWS_ACCESS_KEY_ID": "AKIAEXAMPLE", "AWS_SECRET_ACCESS_KEY": "s3cr3t",
               "AWS_ENDPOINT_URL": "http://127.0.0.1:9000", "HOME": "/root", "AWS_REGION": ""}
    env = job_runtime_env.runtime_env(True, environ)
    assert env["env_vars"] == {**{k: environ[k] for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
                                                          "AWS_ENDPOINT_URL")}}
    assert "env_vars" not in job_runtime_env.runtime_env(False, environ)


def _committed_steps(run: Location) -> list[int]:
    ckpts = run.child("checkpoints")
    names = [n.rstrip("/").rsplit("/", 1)[-1] for n in ckpts.list()] if ckpts.exists() else []
    return sorted(int(n.split("-")[1]) for n in names if n.startswith("step-") and ckpts.exists(f"{n}/COMMIT"))


def test_ray_job_submit_trains_into_object_storage(object_store, s3_bucket):
    from ray.job_submission import JobStatus, JobSubmissionClient

    storage = f"s3://{s3_bucket}/runs"
    submission_id = f"ctm-test-{uuid.uuid4().hex[:8]}"
    with LocalRayHead(num_cpus=2) as head:
        env = dict(head.env, **object_store.env())  # the submitting shell's S3 settings
        runtime_env = subprocess.run([sys.executable, str(REPO / "clusters" / "ray" / "runtime_env.py")],
                                     env=env, capture_output=True, text=True, check=True).stdout
        assert json.loads(runtime_env)["env_vars"]["AWS_SECRET_ACCESS_KEY"] == object_store.secret_key
        submit = subprocess.run(
            ["ray", "job", "submit", "--address", head.dashboard_url, "--submission-id", submission_id,
             "--no-wait", "--working-dir", ".", "--runtime-env-json", runtime_env, "--",
             "python", "launch/parity.py", "--storage", storage, "--name", "submitted", *TINY_PARITY],
            cwd=REPO, env=head.env, capture_output=True, text=True, timeout=120)
        assert submit.returncode == 0, submit.stdout + submit.stderr

        client = JobSubmissionClient(head.dashboard_url)
        deadline = time.monotonic() + 240
        while not (status := client.get_job_status(submission_id)).is_terminal():
            assert time.monotonic() < deadline, client.get_job_logs(submission_id)[-5000:]
            time.sleep(1)
        logs = client.get_job_logs(submission_id)
        assert status == JobStatus.SUCCEEDED, logs[-5000:]
        info = client.get_job_info(submission_id)

    assert "run submitted: 4 steps" in logs
    run = Location.parse(f"{storage}/submitted", endpoint_url=object_store.endpoint_url,
                         key=object_store.access_key, secret=object_store.secret_key)
    assert _committed_steps(run)[-1] == 4
    events = [n for n in run.child("tensorboard").list() if "tfevents" in n]
    assert events, "no TensorBoard events in the run's storage"
    # The keys went in through runtime_env, never into the job's logs.
    assert object_store.secret_key not in logs
    assert info.runtime_env["env_vars"]["AWS_ACCESS_KEY_ID"] == object_store.access_key
