"""The evaluation commands as a new user meets them: a demo run trained into the embedded object store
(a short real run, see ``eval_fixtures.train_demo_run``), then evaluate / visualize / predict / export
with the input pipeline it trained with, the commands printed after training run as printed, and bad
input ending in one error line with exit 2."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from eval_fixtures import DEMO_DATA, DEMO_RUN, tiny_ctm

from ctm_dist.eval.cli import evaluate_main, export_main, predict_main
from ctm_dist.eval.commands import next_commands
from ctm_dist.eval.export import save_consolidated
from ctm_dist.storage.checkpoints import sha256_file
from ctm_dist.storage.local import embedded_store

REPO = Path(__file__).resolve().parents[2]
AWS_VARS = (
    "AWS_ENDPOINT_URL",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_REGION",
)


def _env_without_store() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in AWS_VARS}
    env["PYTHONPATH"] = str(REPO)
    return env


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    """(root holding .ctm-dist with the stopped store, training summary, local copy of the run)."""
    root = tmp_path_factory.mktemp("newcomer")
    out = subprocess.run(
        [sys.executable, str(REPO / "tests" / "eval_fixtures.py"), "train-demo", str(root)],
        env=_env_without_store(),
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    summary = json.loads(out.stdout.strip().splitlines()[-1])
    return root, summary, root / "run-copy"


@pytest.fixture
def no_store_env(monkeypatch):
    for k in AWS_VARS:
        monkeypatch.delenv(k, raising=False)


@pytest.fixture
def store_env(demo_run, monkeypatch):
    """The demo's embedded store started again (fresh keys), its AWS_* variables set."""
    root = demo_run[0]
    with embedded_store(root / ".ctm-dist") as store:
        for k, v in store.env().items():
            monkeypatch.setenv(k, v)
        yield store


def _demo_val_files(tmp_path: Path, n: int) -> tuple[list[str], list[int]]:
    from ctm_dist.data.demo_writer import demo_samples

    files, labels = [], []
    for sample in demo_samples(splits=("val",))["val"][:n]:
        path = tmp_path / f"{sample['__key__']}.png"
        path.write_bytes(sample["png"])
        files.append(str(path))
        labels.append(int(sample["cls"]))
    return files, labels


# ------------------------------------------------------------------ item 1: the input pipeline it trained with


def test_evaluate_export_and_predict_use_the_trained_input_pipeline(
    demo_run, store_env, tmp_path, capsys
):
    from ctm_dist.eval.inputs import image_files, input_spec, shard_samples
    from ctm_dist.eval.loading import load_model
    from ctm_dist.inference import predict

    _, summary, _ = demo_run
    trained_top1 = summary["eval/top1"]
    assert trained_top1 > 0.15  # well above chance (0.1): a wrong input size shows
    assert (
        evaluate_main(
            [
                DEMO_RUN,
                "--data",
                DEMO_DATA,
                "--out",
                str(tmp_path / "eval"),
                "--batch-size",
                "128",
                "--timing-batches",
                "0",
            ]
        )
        == 0
    )
    report = json.loads((tmp_path / "eval" / "report.json").read_text())
    assert report["image_size"] == 8
    assert report["classification"]["samples"] == summary["eval/samples"]
    assert abs(report["classification"]["most_certain_top1"] - trained_top1) <= 0.005

    assert export_main([DEMO_RUN, str(tmp_path / "export")]) == 0
    document = json.loads((tmp_path / "export" / "config.json").read_text())
    assert document["inputs"]["image_size"] == 8 and document["meta"]["image_size"] == 8
    assert document["source"]["data"] == DEMO_DATA
    capsys.readouterr()
    # the export alone: its training data and input size come from config.json
    assert (
        evaluate_main(
            [
                str(tmp_path / "export"),
                "--out",
                str(tmp_path / "eval2"),
                "--batch-size",
                "128",
                "--timing-batches",
                "0",
            ]
        )
        == 0
    )
    again = json.loads((tmp_path / "eval2" / "report.json").read_text())
    assert again["classification"]["most_certain_top1"] == pytest.approx(
        report["classification"]["most_certain_top1"]
    )

    # image files go through the same transform as the shards: predict answers as the model does on them
    loaded = load_model(str(tmp_path / "export"))
    files, _ = _demo_val_files(tmp_path, 8)
    from_files = image_files(files, input_spec(loaded))
    from_shards, _, _ = shard_samples(DEMO_DATA, "val", 8, image_size=8)
    assert from_files.shape == (8, 3, 8, 8) and torch.allclose(from_files, from_shards, atol=1e-5)
    capsys.readouterr()
    assert predict_main([DEMO_RUN, *files, "--threshold", "0.5"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    expected = (
        predict(loaded.model, from_shards, certainty_threshold=0.5).predictions.argmax(1).tolist()
    )
    assert len(lines) == 8  # only predictions on stdout (DeepSpeed's messages go to stderr)
    assert [line.split("\t")[1] for line in lines] == [f"class={k}" for k in expected]


def test_input_pipeline_from_the_training_config():
    from ctm_dist.data import transforms as T
    from ctm_dist.eval.inputs import trained_inputs

    demo = trained_inputs(
        {"config": {"data": {"task": "demo", "image_size": 8}}}, {"image_size": 32}
    )
    assert demo == {
        "task": "demo",
        "image_size": 8,
        "mean": list(T.IMAGENET_MEAN),
        "std": list(T.IMAGENET_STD),
        "channels": 3,
    }
    cifar = trained_inputs(
        {"config": {"data": {"task": "cifar10", "image_size": 0}}}, {"image_size": 32}
    )
    assert cifar["image_size"] == 32 and cifar["mean"] == list(T.CIFAR10_MEAN)
    assert (
        trained_inputs({"config": {"data": {"task": "imagenet"}}}, {"image_size": 256})[
            "image_size"
        ]
        == 224
    )
    assert (
        trained_inputs({"config": {"data": {"task": "demo"}}}, {}) is None
    )  # shard set unreadable: unknown
    assert trained_inputs({"config": {"data": {"task": "parity"}}}) is None


# ------------------------------------------------------------------ item 2: the commands printed after training


def test_next_commands_run_as_printed_against_the_stopped_embedded_store(
    demo_run, tmp_path, monkeypatch
):
    root, summary, _ = demo_run
    (root / "launch").unlink(missing_ok=True)
    (root / "launch").symlink_to(REPO / "launch")  # the checkout the user trained in
    commands = next_commands(
        DEMO_RUN, "demo", local_dir=".ctm-dist"
    )  # the trainer's default, run from root
    assert [c.split()[1] for c in commands] == [
        "launch/evaluate.py",
        "launch/visualize.py",
        "launch/export.py",
    ]
    env = _env_without_store()
    for cmd in commands:
        argv = shlex.split(cmd)
        assert argv[0] == "python"
        out = subprocess.run(
            [sys.executable, *argv[1:]],
            cwd=root,
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert out.returncode == 0, f"{cmd}\n{out.stderr[-2000:]}"
    report = json.loads((root / "eval-demo" / "report.json").read_text())
    assert abs(report["classification"]["most_certain_top1"] - summary["eval/top1"]) <= 0.005
    assert list((root / "pictures-demo").glob("*.png"))
    assert (
        json.loads((root / "export-demo" / "config.json").read_text())["inputs"]["image_size"] == 8
    )
    # the export evaluates on the demo shards it names, from the stopped store too (in this process)
    monkeypatch.chdir(root)
    for k in AWS_VARS:
        monkeypatch.delenv(k, raising=False)
    assert evaluate_main(["export-demo", "--out", "eval-export", "--timing-batches", "0"]) == 0
    again = json.loads((root / "eval-export" / "report.json").read_text())
    assert (
        again["classification"]["most_certain_top1"]
        == report["classification"]["most_certain_top1"]
    )


def test_next_commands_name_another_local_dir(tmp_path):
    assert next_commands("s3://ctm-dist/runs/r1", "parity", local_dir=".ctm-dist") == [
        "python launch/evaluate.py s3://ctm-dist/runs/r1 --out eval-r1",
        "python launch/export.py s3://ctm-dist/runs/r1 export-r1",
    ]
    commands = next_commands("s3://ctm-dist/runs/r1", "demo", local_dir=tmp_path / "scratch dir")
    assert all(c.endswith(f"--local-dir '{tmp_path / 'scratch dir'}'") for c in commands)
    assert (
        next_commands("s3://my-bucket/runs/r2")[0]
        == "python launch/evaluate.py s3://my-bucket/runs/r2 --out eval-r2"
    )


def test_embedded_run_without_its_store_here_is_one_line(
    tmp_path, monkeypatch, no_store_env, capsys
):
    monkeypatch.chdir(tmp_path)
    assert evaluate_main(["s3://ctm-dist/runs/demo"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--local-dir" in err[0] and ".ctm-dist" in err[0]


# ------------------------------------------------------------------ item 7: one-line errors, exit 2


@pytest.fixture
def export_dir(tmp_path):
    return str(
        save_consolidated(
            tiny_ctm(seed=1), tmp_path / "export", task="demo", meta={"image_size": 16}
        )
    )


def _one_error_line(capsys) -> str:
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), captured.err
    return lines[0]


def test_evaluate_without_data_is_one_line(export_dir, capsys):
    assert evaluate_main([export_dir]) == 2
    assert "--data" in _one_error_line(capsys)


def test_predict_on_a_file_that_is_no_image_is_one_line(export_dir, tmp_path, capsys):
    text = tmp_path / "notes.txt"
    text.write_text("not a picture\n")
    assert predict_main([export_dir, str(text)]) == 2
    line = _one_error_line(capsys)
    assert "notes.txt" in line and "not an image" in line


def test_export_given_an_export_is_one_line(export_dir, tmp_path, capsys):
    assert export_main([export_dir, str(tmp_path / "again")]) == 2
    assert "already an export" in _one_error_line(capsys)


@pytest.mark.parametrize(
    "argv",
    [["--threshold", "80"], ["--threshold", "-0.1"], ["--image-size", "0"], ["--step", "-1"]],
)
def test_out_of_range_values_are_refused(export_dir, tmp_path, capsys, argv):
    image = tmp_path / "x.png"
    from PIL import Image

    Image.new("RGB", (16, 16)).save(image)
    with pytest.raises(SystemExit) as e:
        predict_main([export_dir, str(image), *argv])
    assert e.value.code == 2
    _one_error_line(capsys)
    assert capsys.readouterr().out == ""


# ------------------------------------------------------------------ 13.12: unsafe or corrupt checkpoints


class RunsCode:
    """A pickle that calls a function when loaded (a harmless one here)."""

    def __reduce__(self):
        return (os.getcwd, ())


def test_unsafe_or_corrupt_reference_checkpoint_is_one_line(tmp_path, capsys):
    unsafe = tmp_path / "unsafe.pt"
    torch.save({"args": {}, "model_state_dict": {}, "hook": RunsCode()}, unsafe)
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(unsafe.read_bytes()[:100])
    image = tmp_path / "x.png"
    from PIL import Image

    Image.new("RGB", (16, 16)).save(image)
    assert predict_main([str(unsafe), str(image)]) == 2
    line = _one_error_line(capsys)
    assert "unsafe.pt" in line and "refused" in line and "weights_only=False" not in line
    assert evaluate_main([str(corrupt), "--data", str(tmp_path)]) == 2
    line = _one_error_line(capsys)
    assert "corrupt.pt" in line


@pytest.mark.parametrize("damage", ["unsafe", "truncated"])
def test_unsafe_or_corrupt_zero_checkpoint_is_one_line(demo_run, tmp_path, capsys, damage):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(demo_run[2], run)
    states = next(run.rglob("mp_rank_00_model_states.pt"))
    if damage == "unsafe":
        torch.save({"module": RunsCode()}, states)
    else:
        states.write_bytes(states.read_bytes()[:200])
    # as a forger with write access would: COMMIT's size and checksum made to match the new file
    commit_path = states.parent / "COMMIT"
    commit = json.loads(commit_path.read_text())
    commit["files"][states.name] = states.stat().st_size
    commit["sha256"][states.name] = sha256_file(states)
    commit_path.write_text(json.dumps(commit))
    for main, argv in (
        (export_main, [str(run), str(tmp_path / "out")]),
        (evaluate_main, [str(run), "--data", str(tmp_path)]),
    ):
        assert main(argv) == 2
        line = _one_error_line(capsys)
        assert "mp_rank_00_model_states.pt" in line
        assert ("refused" if damage == "unsafe" else "not a torch checkpoint file") in line
        assert "weights_only=False" not in line
