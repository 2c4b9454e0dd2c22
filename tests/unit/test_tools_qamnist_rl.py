"""The offline tools on Q&A MNIST and RL runs: a tiny run of each trained by the trainer (its
DeepSpeed engine in this process, no Ray, a local run directory), then ``launch/evaluate.py``,
``launch/visualize.py`` and ``launch/export.py`` (their ``*_main``) on the run and its exports.

Evaluate's numbers are checked against a direct computation with the trained weights, and the
reference-format export against the trained model's outputs."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import ctm_dist
from ctm_dist.compat import load_reference_checkpoint, read_reference_checkpoint
from ctm_dist.data.qamnist import DigitPool, QAMNISTLoader
from ctm_dist.data.qamnist_writer import sklearn_digits_splits, write_qamnist_shards
from ctm_dist.data.rl_envs import make_vector_env
from ctm_dist.eval.cli import evaluate_main, export_main, visualize_main
from ctm_dist.eval.evaluate import EvalRequest, evaluate_part, merge_parts, summarise
from ctm_dist.tasks.qamnist_offline import operation_counts
from ctm_dist.train.cli import TASK_DEFAULTS
from ctm_dist.train.config import build_config
from ctm_dist.train.loop import Trainer

pytestmark = pytest.mark.usefixtures("one_torch_thread", "process_group")

SEED = EvalRequest.qamnist_seed  # the tools' default question and episode seeds
RL_SEED = EvalRequest.rl_seed
IMAGE_SIZE = 12


def train(tmp_path, task: str, name: str, extra: list[str]):
    """Train ``task`` for 2 steps into ``tmp_path/store/name``; returns (run URL, trained model)."""
    cfg = build_config(
        None,
        [
            f"run.local_dir={tmp_path / 'local'}",
            f"run.storage={tmp_path / 'store'}",
            f"run.name={name}",
            "run.max_steps=2",
            "checkpoint.every=2",
            "scale.workers=1",
            "eval.every=0",
            "deepspeed.precision=fp32",
            *extra,
        ],
        TASK_DEFAULTS[task],
    )
    trainer = Trainer(cfg, 0, 1, torch.device("cpu"))
    trainer.fit()
    trainer.checkpointer.close()
    return str(tmp_path / "store" / name), trainer.engine.module.eval()


@pytest.fixture(scope="module")
def qamnist_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("qamnist-tools")
    splits = {k: (v[0][:60], v[1][:60]) for k, v in sklearn_digits_splits(0).items()}
    write_qamnist_shards(str(root / "digits"), splits, "sklearn-digits", samples_per_shard=32)
    run, model = train(
        root,
        "qamnist",
        "qamnist",
        [
            f"data.url={root / 'digits'}",
            f"data.image_size={IMAGE_SIZE}",  # the 8x8 digits resized, as training saw them
            "data.batch_size=8",
            "model.preset=qamnist-small",
            "model.overrides.d_model=32",
            "model.overrides.d_input=8",
            "model.overrides.n_synch_out=4",
            "model.overrides.n_synch_action=4",
            "model.overrides.memory_length=3",
            "model.overrides.iterations_per_digit=2",
            "model.overrides.iterations_per_question_part=2",
            "model.overrides.iterations_for_answering=2",
        ],
    )
    return root, run, model, str(root / "digits")


@pytest.fixture(scope="module")
def rl_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("rl-tools")
    run, agent = train(
        root,
        "rl",
        "rl",
        [
            "model.preset=cartpole-small",
            "model.overrides.d_model=16",
            "model.overrides.d_input=8",
            "model.overrides.n_synch_out=4",
            "rl.num_envs=4",
            "rl.num_steps=8",
            "rl.num_minibatches=2",
            "rl.max_environment_steps=40",
        ],
    )
    return root, run, agent


def report(out) -> dict:
    return json.loads((out / "report.json").read_text())


@torch.no_grad()
def direct_qamnist_accuracy(model, digits: str, questions: int, batch_size: int):
    """Accuracy at the most certain answer tick, overall and per number of operations."""
    cfg = model.cfg
    loader = QAMNISTLoader.for_model(
        DigitPool.read(digits, "val"),
        cfg,
        batch_size=batch_size,
        seed=SEED,
        samples_per_epoch=questions,
        cycle_operations=True,
        image_size=IMAGE_SIZE,
    )
    right, by_ops = [], {}
    for batch in loader:
        valid = batch["valid"]
        p, c, _ = model(batch["input"][valid], batch["question"][valid])
        answer_p, answer_c = p[..., -cfg.iterations_for_answering :], c[:, 1, -2:]
        chosen = answer_p[torch.arange(len(answer_p)), :, answer_c.argmax(-1)].argmax(-1)
        hits = (chosen == batch["target"][valid]).tolist()
        right += hits
        by_ops.setdefault(str(int(batch["operations"][0])), []).extend(hits)
    return np.mean(right), {k: np.mean(v) for k, v in by_ops.items()}, len(right)


def test_qamnist_run_evaluate_visualize_and_export(qamnist_run, tmp_path, capsys):
    root, run, model, digits = qamnist_run
    out = tmp_path / "eval"
    argv = [run, "--out", str(out), "--qamnist-questions", "24", "--batch-size", "8"]
    assert evaluate_main(argv) == 0
    assert report(out)["image_size"] == IMAGE_SIZE
    q = report(out)["qamnist"]
    accuracy, by_ops, n = direct_qamnist_accuracy(model, digits, 24, 8)
    assert q["samples"] == n == 24
    assert q["accuracy"] == pytest.approx(accuracy, abs=1e-9)
    assert q["accuracy_by_operations"] == pytest.approx(by_ops, abs=1e-9)
    assert set(by_ops) == {str(n) for n in operation_counts(model.cfg)}  # each count in turn
    assert "qamnist 24: answer accuracy" in capsys.readouterr().out
    req = EvalRequest(run, qamnist_questions=24, batch_size=8)  # two workers' sums, merged
    assert summarise(merge_parts([evaluate_part(req, r, 2) for r in (0, 1)]))["qamnist"] == q

    pictures = tmp_path / "pictures"
    assert visualize_main([run, "--out", str(pictures), "--count", "4", "--per-input", "1"]) == 0
    names = {p.name for p in pictures.glob("*.png")}
    assert names == {"certainty_per_tick.png", "question_0.png", "answer_0.png"}
    capsys.readouterr()
    argv = [run, "--out", str(tmp_path / "p2"), "--count", "2", "--images", "digit.png"]
    assert visualize_main(argv) == 2  # questions are its inputs: one line, no traceback
    last = capsys.readouterr().err.strip().splitlines()[-1]  # after DeepSpeed's progress bar
    assert last == "error: task 'qamnist' draws its pictures from its own inputs: no --images"

    # consolidated export: the trained outputs, and it evaluates alike (it records its data)
    export_dir = tmp_path / "export"
    assert export_main([run, str(export_dir)]) == 0
    exported = ctm_dist.load(str(export_dir))
    pool = DigitPool.read(digits, "val")
    batch = next(iter(QAMNISTLoader(pool, batch_size=3, repeats=2, image_size=IMAGE_SIZE)))
    probe = (batch["input"], batch["question"])
    with torch.no_grad():
        trained = model(*probe)
        assert torch.equal(exported(*probe)[0], trained[0])
    assert (
        evaluate_main(
            [
                str(export_dir),
                "--out",
                str(tmp_path / "e2"),
                "--qamnist-questions",
                "24",
                "--batch-size",
                "8",
            ]
        )
        == 0
    )
    assert report(tmp_path / "e2")["qamnist"] == q

    # the reference's QAMNIST format, round trip through its loader
    ref = tmp_path / "qamnist.pt"
    assert export_main([run, str(ref), "--reference"]) == 0
    assert not hasattr(read_reference_checkpoint(str(ref))["args"], "dataset")
    with torch.no_grad():
        p, c, _ = load_reference_checkpoint(str(ref))(*probe)
    assert torch.allclose(p, trained[0], atol=1e-6) and torch.allclose(c, trained[1], atol=1e-6)


@torch.no_grad()
def direct_returns(agent, episodes: int) -> tuple[list[float], list[int]]:
    """Greedy episodes one at a time, seed RL_SEED + i, the run's CartPole (40 steps at most)."""
    returns, lengths = [], []
    for i in range(episodes):
        env = make_vector_env("CartPole-v1", 1, 40, True)
        obs, _ = env.reset(seed=RL_SEED + i)
        hidden, total, steps, ended = agent.get_initial_state(1), 0.0, 0, False
        while not ended:
            features, hidden = agent(torch.as_tensor(obs, dtype=torch.float32), hidden)
            action = agent.actor(features).argmax(-1)
            obs, reward, terminated, truncated, _ = env.step(action.numpy())
            total, steps, ended = total + float(reward[0]), steps + 1, terminated[0] or truncated[0]
        env.close()
        returns.append(total)
        lengths.append(steps)
    return returns, lengths


def test_rl_run_evaluate_visualize_and_export(rl_run, tmp_path, capsys):
    root, run, agent = rl_run
    out = tmp_path / "eval"
    assert evaluate_main([run, "--out", str(out), "--episodes", "3"]) == 0
    r = report(out)["rl"]
    returns, lengths = direct_returns(agent, 3)
    assert r["env_id"] == "CartPole-v1" and r["episodes"] == 3 and r["policy"] == "greedy"
    assert r["returns"] == returns and r["lengths"] == lengths
    assert r["mean_return"] == pytest.approx(np.mean(returns))
    assert r["mean_length"] == pytest.approx(np.mean(lengths))
    assert "rl CartPole-v1, 3 episodes, greedy policy: mean return" in capsys.readouterr().out
    req = EvalRequest(run, episodes=3)  # two workers' episodes, merged
    assert summarise(merge_parts([evaluate_part(req, r, 2) for r in (0, 1)]))["rl"] == r

    pictures = tmp_path / "pictures"
    assert visualize_main([run, "--out", str(pictures), "--count", "3", "--per-input", "2"]) == 0
    names = {p.name for p in pictures.glob("*.png")}
    assert names == {"episode_returns.png", "episode_0.png", "episode_1.png"}

    export_dir = tmp_path / "export"
    assert export_main([run, str(export_dir)]) == 0
    assert evaluate_main([str(export_dir), "--out", str(tmp_path / "e2"), "--episodes", "3"]) == 0
    assert report(tmp_path / "e2")["rl"] == r  # the export keeps the environment

    ref = tmp_path / "rl.pt"
    assert export_main([run, str(ref), "--reference"]) == 0
    assert read_reference_checkpoint(str(ref))["args"].env_id == "CartPole-v1"
    loaded = load_reference_checkpoint(str(ref))
    obs = torch.randn(5, 4)
    with torch.no_grad():
        ours, hidden = agent(obs, agent.get_initial_state(5))
        theirs, their_hidden = loaded(obs, loaded.get_initial_state(5))
        assert torch.allclose(theirs, ours, atol=1e-6)
        assert torch.allclose(loaded.actor(theirs), agent.actor(ours), atol=1e-6)
        assert torch.allclose(loaded.critic(theirs), agent.critic(ours), atol=1e-6)
    capsys.readouterr()
    # the reference's file does not record the environment's episode limit: a one-line refusal
    assert evaluate_main([str(ref), "--task", "rl", "--out", str(tmp_path / "e3")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "records no RL environment" in err and "\n" not in err
