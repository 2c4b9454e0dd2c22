"""The launchers' shared command line: flags map to config fields; bad input stops before Ray starts."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from cluster_fixtures import REPO, TINY_LAUNCH, files_holding

from ctm_dist.train.cli import config_from_args, main, make_parser, run


def _cfg(task, *argv):
    return config_from_args(task, make_parser("x", task).parse_intermixed_args(list(argv)))


def test_flags_and_dotted_overrides_reach_the_config(tmp_path):
    yaml_file = tmp_path / "c.yaml"
    yaml_file.write_text("optim: {lr: 0.5}\nrun: {max_steps: 7}\n")
    cfg = _cfg(
        "imagenet",
        "--data",
        "s3://b/imagenet",
        "--storage",
        "s3://b/runs",
        "--name",
        "r1",
        "--workers",
        "4",
        "--gpus-per-worker",
        "1",
        "--zero-stage",
        "3",
        "--precision",
        "fp16",
        "--tick-checkpointing",
        "5",
        "--batch-size",
        "128",
        "--checkpoint-every",
        "50",
        "--config",
        str(yaml_file),
        "model.d_model=256",
        "optim.lr=1e-3",
    )
    assert (cfg.data.url, cfg.run.storage, cfg.run.name) == ("s3://b/imagenet", "s3://b/runs", "r1")
    assert (cfg.scale.workers, cfg.scale.gpus_per_worker, cfg.deepspeed.zero_stage) == (4, 1.0, 3)
    assert (
        cfg.deepspeed.precision == "fp16"
        and cfg.data.batch_size == 128
        and cfg.checkpoint.every == 50
    )
    assert cfg.model.preset == "imagenet" and cfg.data.task == "imagenet"
    assert cfg.model.overrides == {"tick_checkpointing": 5, "d_model": 256}
    assert cfg.optim.lr == pytest.approx(1e-3)  # the override beats the YAML file
    assert cfg.run.max_steps == 7  # the YAML beats the task default


def test_imagenet_launcher_without_data_is_the_demo():
    cfg = _cfg("imagenet")
    assert cfg.data.task == "demo" and cfg.model.preset == "demo" and cfg.data.url == ""
    assert (cfg.scale.workers, cfg.deepspeed.zero_stage, cfg.deepspeed.precision) == (2, 2, "bf16")
    assert cfg.model.overrides.get("tick_checkpointing", 0) > 0
    assert cfg.eval.every > 0 and cfg.checkpoint.every > 0
    assert _cfg("parity").data.task == "parity" and _cfg("parity").model.preset == "parity"


@pytest.mark.parametrize(
    "task, args, fragment",
    [
        ("imagenet", ["--zero-stage", "4"], "zero_stage must be 0, 1, 2 or 3"),
        ("imagenet", ["--batch-size", "63"], "not divisible by scale.workers"),
        ("imagenet", ["optim.nope=1"], "unknown config field 'optim.nope'"),
        ("mazes", [], "data.url is required for task 'mazes'"),
        ("cifar10", ["--workers", "two"], "scale.workers: expected an integer"),
        ("parity", ["--bogus"], "unrecognized arguments: --bogus"),
    ],
)
def test_bad_input_is_one_line_and_exit_2_before_anything_starts(
    task, args, fragment, tmp_path, monkeypatch, capsys
):
    """The launchers' shared main, in this process (the script around it: the next test)."""
    monkeypatch.setenv(
        "RAY_ADDRESS", "127.0.0.1:1"
    )  # would hang/fail if anything tried to reach Ray
    monkeypatch.chdir(tmp_path)
    try:
        code = main(task, [*args, f"run.local_dir={tmp_path}"])
    except SystemExit as e:  # the parser's own errors
        code = e.code
    out, err = capsys.readouterr()
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and fragment in lines[0], err
    assert out == ""
    assert not any(tmp_path.iterdir()), "something was created before the config was validated"


def test_bad_yaml_file_is_one_line(tmp_path):
    """Through the script, as users run it: exit status 2, one line on stderr, nothing else."""
    bad = tmp_path / "bad.yaml"
    bad.write_text("optim: {lr: [1, 2\n")
    proc = subprocess.run(
        [sys.executable, str(REPO / "launch" / "imagenet.py"), "--config", str(bad)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
        env=dict(os.environ, RAY_ADDRESS="127.0.0.1:1"),
    )
    assert proc.returncode == 2
    assert (
        proc.stderr.strip().startswith("error: bad YAML in")
        and len(proc.stderr.strip().splitlines()) == 1
    )
    assert proc.stdout == "" and sorted(p.name for p in tmp_path.iterdir()) == ["bad.yaml"]


@pytest.mark.parametrize("problem", ["missing shard index", "wrong credentials"])
def test_unusable_data_or_storage_fails_once_before_any_worker_starts(
    problem, object_store, s3_bucket, tmp_path
):
    """Checked in the driver, so Ray never starts (and never retries workers) for input that cannot work."""
    env = dict(
        os.environ, **object_store.env(), RAY_ADDRESS="127.0.0.1:1"
    )  # reaching Ray would fail
    wrong = "wrong-secret-0123456789abcdef"
    if problem == "wrong credentials":
        env["AWS_SECRET_ACCESS_KEY"] = wrong
    started = time.monotonic()
    proc = subprocess.run(
        [
            sys.executable,
            str(REPO / "launch" / "imagenet.py"),
            f"run.local_dir={tmp_path}",
            f"run.storage=s3://{s3_bucket}/runs",
            f"data.url=s3://{s3_bucket}/nothing-here",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        cwd=tmp_path,
    )
    assert proc.returncode == 1, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    fragment = (
        "no shard index 'train.json'" if problem == "missing shard index" else "access denied"
    )
    assert last.startswith("error: training failed") and fragment in last, proc.stderr[-2000:]
    assert (
        wrong not in proc.stderr + proc.stdout
        and object_store.secret_key not in proc.stderr + proc.stdout
    )
    assert "127.0.0.1:1" not in proc.stderr, (
        "the driver tried to reach Ray before checking its input"
    )
    assert time.monotonic() - started < 60


def _launch(launcher, *args, env=None, cwd, timeout=120):
    return subprocess.run(
        [sys.executable, str(REPO / "launch" / launcher), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        cwd=cwd,
    )


def _local_env(**extra):
    """No cluster to join: a launcher would start its own Ray (and, without --storage, the embedded store)."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS" and not k.startswith("AWS_")}
    env.update(extra)
    return env


@pytest.mark.parametrize(
    "args, fragment",
    [
        (
            ["--workers", "64"],
            "--workers 64 x 1 CPU per worker needs 64 CPUs, but this machine has",
        ),
        (
            ["--gpus-per-worker", "1"],
            "--workers 2 x 1 GPU per worker needs 2 GPUs, but this machine has 0",
        ),
    ],
)
def test_more_workers_than_ray_has_is_refused_in_one_line(args, fragment, tmp_path):
    if "--gpus-per-worker" in args:
        import torch

        if torch.cuda.is_available():
            pytest.skip("this machine has GPUs")
    started = time.monotonic()
    proc = _launch(
        "imagenet.py", *args, f"run.local_dir={tmp_path}", env=_local_env(), cwd=tmp_path
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and fragment in lines[0], proc.stderr[
        -2000:
    ]
    assert not any(tmp_path.iterdir()), "the store or Ray started before the refusal"
    assert time.monotonic() - started < 30


def test_joined_cluster_resources_are_checked():
    from ctm_dist.train.driver import LaunchRefused, check_resources

    cfg = _cfg("imagenet", "--workers", "4", "scale.cpus_per_worker=2")
    check_resources(cfg, {"CPU": 8.0}, "the Ray cluster at x")
    with pytest.raises(LaunchRefused, match="needs 8 CPUs, but the Ray cluster at x has 7"):
        check_resources(cfg, {"CPU": 7.0, "GPU": 8.0}, "the Ray cluster at x")


def test_second_launcher_on_the_same_directory_is_refused(tmp_path):
    from ctm_dist.storage.local import lock_directory

    keys = tmp_path / "object-store" / "s3-identities.json"
    keys.parent.mkdir()
    keys.write_text("the running store's identities")
    with lock_directory(tmp_path):  # the first launcher
        proc = _launch(
            "imagenet.py",
            f"run.local_dir={tmp_path}",
            env=_local_env(RAY_ADDRESS="127.0.0.1:1"),
            cwd=tmp_path,
        )
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines() == [
        f"error: another launcher (pid {os.getpid()}) is using {tmp_path}; wait for it to finish, or pass --storage"
    ]
    assert keys.read_text() == "the running store's identities"
    with lock_directory(tmp_path):  # released when its holder let go
        pass


def test_second_job_on_a_run_being_trained_is_refused_before_any_worker_starts(tmp_path):
    from ctm_dist.storage import Location
    from ctm_dist.train.lease import RunLease

    lease = RunLease(Location.parse(str(tmp_path / "runs" / "r1" / "checkpoints")), ttl=3)
    lease.acquire()  # the first job, renewing its lease every second
    try:
        proc = _launch(
            "imagenet.py",
            "--storage",
            str(tmp_path / "runs"),
            "--name",
            "r1",
            env=_local_env(RAY_ADDRESS="127.0.0.1:1"),
            cwd=tmp_path,
        )
    finally:
        lease.release()
    assert proc.returncode == 2, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "run r1 is being trained by another job" in errors[0], proc.stderr
    assert "Traceback" not in proc.stderr


def test_s3_data_with_the_embedded_store_keeps_the_users_endpoint_or_refuses(tmp_path):
    env = _local_env(
        AWS_ENDPOINT_URL="http://127.0.0.1:9",
        AWS_ACCESS_KEY_ID="mine",
        AWS_SECRET_ACCESS_KEY="mine2",
    )
    proc = _launch(
        "imagenet.py",
        "--data",
        "s3://my-bucket/imagenet",
        f"run.local_dir={tmp_path}",
        env=env,
        cwd=tmp_path,
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "--storage" in lines[0] and "s3://my-bucket/imagenet" in lines[0], (
        proc.stderr
    )
    assert "shard index" not in proc.stderr and not any(tmp_path.iterdir())


def test_embedded_store_dies_with_its_launcher(tmp_path):
    """SIGKILL to the process that started weed (which runs in its own session) still ends weed."""
    script = (
        "import sys, time\nfrom ctm_dist.storage.local import LocalObjectStore\n"
        "s = LocalObjectStore(sys.argv[1]).start()\nprint(s._proc.pid, flush=True)\ntime.sleep(120)\n"
    )
    parent = subprocess.Popen(
        [sys.executable, "-c", script, str(tmp_path)], stdout=subprocess.PIPE, text=True
    )
    try:
        weed = int(parent.stdout.readline())
        os.kill(weed, 0)
        parent.kill()
        parent.wait(10)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and _alive(weed):
            time.sleep(0.1)
        assert not _alive(weed), "weed outlived the process that started it"
    finally:
        parent.kill()


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_gpu_user_without_gpus_per_worker_is_told_the_run_is_on_cpu(monkeypatch):
    import io

    import torch

    from ctm_dist.train.driver import LaunchRefused, train

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    out = io.StringIO()
    with pytest.raises(LaunchRefused):  # stops right after the warning, before anything starts
        train(_cfg("imagenet", "--data", "s3://elsewhere/x"), stream=out)
    assert out.getvalue().splitlines() == [
        "warning: this machine has CUDA GPUs but --gpus-per-worker is 0: the run trains on CPU"
    ]


def test_help_shows_defaults_and_where_fields_are_documented_and_print_config_round_trips(
    tmp_path, monkeypatch, capsys
):
    import yaml

    from ctm_dist.train.config import build_config

    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:1")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as done:
        main("parity", ["--help"])
    assert done.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "[run.max_steps; default: 200000]" in text and "[scale.workers; default: 2]" in text
    assert "ctm_dist/train/config.py" in text and "configs/" in text
    code = main(
        "parity", ["--print-config", "--workers", "4", "optim.lr=0.01", f"run.local_dir={tmp_path}"]
    )
    out, err = capsys.readouterr()
    assert code == 0 and err == ""
    printed = tmp_path / "printed.yaml"
    printed.write_text(out)
    assert yaml.safe_load(out)["scale"]["workers"] == 4
    assert (
        build_config(str(printed)).to_dict()
        == _cfg("parity", "--workers", "4", "optim.lr=0.01", f"run.local_dir={tmp_path}").to_dict()
    )
    assert [p.name for p in tmp_path.iterdir()] == ["printed.yaml"]  # nothing started


def test_launchers_have_no_sys_path_hack_and_console_commands(monkeypatch, capsys):
    import tomllib

    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    for launcher in (REPO / "launch").glob("*.py"):
        assert "sys.path" not in launcher.read_text(), launcher.name
    for task in ("imagenet", "cifar10", "mazes", "parity", "qamnist"):
        assert scripts[f"ctm-{task}"] == f"ctm_dist.train.cli:{task}"
    for tool in ("evaluate", "visualize", "predict", "export"):
        assert scripts[f"ctm-{tool}"] == f"ctm_dist.eval.cli:{tool}_main"
    assert scripts["ctm-train"] == "ctm_dist.train.cli:run"
    monkeypatch.setattr(sys, "argv", ["ctm-train", "mazes", "--workers", "x"])
    with pytest.raises(SystemExit) as done:
        run()
    assert done.value.code == 2 and "scale.workers: expected an integer" in capsys.readouterr().err


@pytest.mark.parametrize("task", ["imagenet", "cifar10", "mazes", "parity", "sort"])
def test_full_scale_example_configs_load_and_validate(task):
    from ctm_dist.train.config import build_config

    path = REPO / "configs" / f"{task}.yaml"
    cfg = build_config(str(path))  # on its own: every field it needs is in the file
    assert cfg.data.task == task and cfg.model.preset == task and cfg.scale.gpus_per_worker >= 1
    assert cfg.run.max_steps >= 100_000
    via_launcher = _cfg(task, "--config", str(path))
    assert via_launcher.to_dict() == cfg.to_dict()


TINY = [*TINY_LAUNCH, "eval.every=2", "model.tick_checkpointing=0"]


def _processes_with(marker: bytes) -> dict[int, tuple[bytes, bytes]]:
    """pid -> (cmdline, environ) of the processes whose environment holds ``marker``."""
    found = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                environ = (entry / "environ").read_bytes()
                if marker in environ:
                    found[int(entry.name)] = ((entry / "cmdline").read_bytes(), environ)
            except OSError:
                pass
    return found


def test_launcher_embedded_default_ctrl_c_then_relaunch_of_the_finished_run(tmp_path):
    """One short launcher run on the embedded store and a private Ray: the store's secret reaches no Ray
    process environment nor Ray's logs; the log is our lines only; Ctrl-C (SIGINT to the launcher's
    process group, as a terminal sends it) checkpoints and says how to resume; a relaunch up to that
    step is 'already complete' at once, without Ray; config.yaml lies beside the checkpoints; a launcher
    killed with SIGKILL leaves no store or Ray process behind."""
    import json
    import re
    import tempfile
    import threading
    import uuid

    from ctm_dist.storage import Location
    from ctm_dist.storage.local import LocalObjectStore

    ray_tmp = tempfile.mkdtemp(prefix="ctmr", dir="/tmp")  # short: Ray's socket paths live under it
    marker = f"CTM_TEST_RUN={uuid.uuid4().hex}"
    local = tmp_path / "cd"
    env = _local_env(RAY_TMPDIR=ray_tmp, **dict([marker.split("=")]))
    argv = [
        sys.executable,
        str(REPO / "launch" / "imagenet.py"),
        "--name",
        "e2e",
        f"run.local_dir={local}",
        *TINY,
    ]
    proc = subprocess.Popen(
        [*argv, "--max-steps", "400"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=tmp_path,
        start_new_session=True,
    )
    lines: list[str] = []
    out: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stderr), daemon=True)
    reader.start()
    out_reader = threading.Thread(target=lambda: out.extend(proc.stdout), daemon=True)
    out_reader.start()
    ray_processes: dict = {}
    try:
        deadline = time.monotonic() + 400
        while time.monotonic() < deadline and proc.poll() is None:
            for pid, (cmdline, environ) in _processes_with(marker.encode()).items():
                ray_processes.setdefault(pid, (cmdline, environ))
            if sum(bool(re.match(r"step (\d+)/400 \| loss", line)) for line in list(lines)) >= 3:
                break
            time.sleep(0.5)
        assert proc.poll() is None, "".join(lines)[-3000:]
        os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C
        proc.wait(
            timeout=180
        )  # the readers own the pipes: communicate() would take their last lines
        reader.join(10)
        out_reader.join(10)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    stderr, stdout = "".join(lines), "".join(out)
    assert proc.returncode == 130, stderr[-3000:]
    stopped = re.search(
        r"stopped by Ctrl-C at step (\d+); checkpoint committed. Run the same command again to "
        r"resume run e2e",
        stderr,
    )
    assert stopped, stderr[-3000:]
    step = int(stopped.group(1))

    secret = json.loads((local / "object-store" / "s3-identities.json").read_text())["identities"][
        0
    ]["credentials"][0]["secretKey"].encode()
    kinds = {
        kind: [pid for pid, (cmd, _) in ray_processes.items() if kind.encode() in cmd]
        for kind in ("gcs_server", "raylet", "dashboard")
    }
    # the GCS was once missing from the samples of a loaded clean-clone run; the secret check below
    # covers every Ray process that was sampled
    assert kinds["raylet"] and kinds["dashboard"], {
        pid: cmd[:120] for pid, (cmd, _) in ray_processes.items()
    }
    for pid, (cmdline, environ) in ray_processes.items():
        assert secret not in environ and secret not in cmdline, (
            f"the store's secret is in pid {pid}: {cmdline[:200]}"
        )
    assert not files_holding(ray_tmp, secret), "the store's secret is in Ray's session files"
    assert secret.decode() not in stderr + stdout
    assert oct((local / "object-store" / "aws-credentials").stat().st_mode & 0o777) == "0o600"

    # our lines only: no Ray Train / DeepSpeed chatter
    for chatter in (
        "TrainingReport(",
        "shm_comm_op",
        "FutureWarning",
        "core_worker.cc",
        "Traceback",
    ):
        assert chatter not in stderr, (chatter, stderr[-3000:])
    step_lines = [line for line in stderr.splitlines() if re.match(r"step \d+/400 \| loss", line)]
    stamp = r"^step \d+/400 \| .*mem \d+\.\d\dGiB.* \| \d{4}-\d\d-\d\d \d\d:\d\d:\d\d \| elapsed \d+:\d\d:\d\d"
    assert step_lines and all(re.match(stamp, line) for line in step_lines), step_lines
    assert all(" | eta " in line for line in step_lines[1:]) and " | eta " not in step_lines[0]
    assert stderr.count("tick: the mean internal tick") == 1
    assert len(stderr.splitlines()) < len(step_lines) + 12, stderr

    # the launcher took its store and Ray down with it
    deadline = time.monotonic() + 30
    while _processes_with(marker.encode()) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not _processes_with(marker.encode()), "processes of the run outlived the launcher"

    sessions = sorted(os.listdir(os.path.join(ray_tmp, "ray")))
    started = time.monotonic()
    again = subprocess.run(
        [*argv, "--max-steps", str(step)],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=120,
    )
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.startswith(f"run e2e is already complete at step {step} "), again.stdout
    assert time.monotonic() - started < 30
    assert sorted(os.listdir(os.path.join(ray_tmp, "ray"))) == sessions, (
        "Ray was started for a finished run"
    )

    with LocalObjectStore(local / "object-store") as store:
        run = Location.parse(
            "s3://ctm-dist/runs/e2e",
            endpoint_url=store.endpoint_url,
            key=store.access_key,
            secret=store.secret_key,
        )
        saved = run.read_bytes("config.yaml").decode()
    assert "name: e2e" in saved and "workers: 1" in saved and secret.decode() not in saved

    # SIGKILL to the launcher once its Ray is up: neither its store nor its Ray outlives it
    killed = subprocess.Popen(
        [*argv, "--max-steps", "400"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=env,
        cwd=tmp_path,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and not any(
            b"raylet" in cmd for cmd, _ in _processes_with(marker.encode()).values()
        ):
            time.sleep(0.5)
        assert killed.poll() is None, "the relaunch ended early"
        killed.kill()
        killed.wait(10)
        # Ray's agents notice their raylet's death by polling it: seconds on a quiet machine,
        # longer on a loaded 2-core one
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and _processes_with(marker.encode()):
            time.sleep(0.5)
        left = {pid: cmd[:100] for pid, (cmd, _) in _processes_with(marker.encode()).items()}
        assert not left, f"processes of the killed launcher remain: {left}"
    finally:
        for pid in _processes_with(marker.encode()):
            os.kill(pid, signal.SIGKILL)
        shutil.rmtree(ray_tmp, ignore_errors=True)
