"""Losing a whole node: a worker node of a multi-node Ray cluster dies mid-run.

The cluster (``cluster_child.py``: ``ray.cluster_utils.Cluster`` in a process of its own) has a
head without CPUs and two 1-CPU worker nodes, so each of the run's two Ray Train workers runs on
a node of its own while the driver, Ray Train's controller and the progress actor stay on the
head. The launcher joins that cluster by its address. With both workers held (SIGSTOP) at a
step rank 0 has just logged, one worker node is killed at once (its raylet, which holds the
object store, and every process it started, SIGKILL), then a replacement 1-CPU node joins.
Ray Train restarts the worker group across the surviving node and the new one; training resumes
from the newest committed checkpoint, no committed step is lost, and the final checkpoint is
bitwise identical to the uninterrupted reference run's.
"""

from __future__ import annotations

import json
import os
import queue
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import chaos_harness as H
import chaos_runs as R
import psutil
import pytest
from chaos_runs import STEPS

WORKERS = 2  # R.tiny_overrides' default: one per worker node
CLUSTER_CHILD = Path(__file__).with_name("cluster_child.py")


class NodeCluster:
    """The cluster child process: ``remove(node_id)`` and ``add()`` answer once they are done."""

    def __init__(self, worker_nodes: int, log_path: Path):
        # Short: Ray's socket paths live under it (AF_UNIX paths are limited to 107 bytes).
        self.tmp = tempfile.mkdtemp(prefix="ctmnl", dir="/tmp")
        self.env = {"RAY_TMPDIR": self.tmp}
        self.answers: queue.Queue = queue.Queue()
        env = dict(os.environ, PYTHONUNBUFFERED="1", **self.env)
        env.pop("RAY_ADDRESS", None)
        with open(log_path, "wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, str(CLUSTER_CHILD), str(worker_nodes)],
                cwd=R.REPO,
                env=env,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=log,
                text=True,
            )
        self.log_path = log_path
        self._reader = threading.Thread(target=self._read, daemon=True, name="cluster-child")
        self._reader.start()
        up = self._answer("up", timeout=120)
        self.address: str = up["address"]
        self.nodes: list[dict] = up["nodes"]

    def _read(self) -> None:
        for line in self.proc.stdout:
            if line.startswith("CLUSTER "):
                self.answers.put(json.loads(line[8:]))
        self.answers.put({"kind": "exited"})

    def _answer(self, kind: str, timeout: float) -> dict:
        try:
            got = self.answers.get(timeout=timeout)
        except queue.Empty:
            got = {"kind": f"nothing within {timeout:.0f}s"}
        if got["kind"] != kind:
            tail = self.log_path.read_text(errors="replace")[-3000:]
            raise AssertionError(f"cluster child: expected {kind!r}, got {got}\n{tail}")
        return got

    def _command(self, kind: str, timeout: float = 120, **cmd) -> dict:
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()
        return self._answer(kind, timeout)

    def remove(self, node_id: str) -> list[int]:
        return self._command("removed", op="remove", node=node_id)["killed"]

    def add(self) -> dict:
        return self._command("added", op="add")["node"]

    def node_of(self, pid: int) -> str | None:
        """The worker node whose raylet started process ``pid``."""
        parent = psutil.Process(pid).ppid()
        return next((n["id"] for n in self.nodes if n["raylet"] == parent), None)

    def close(self) -> None:
        try:
            if self.proc.poll() is None:
                self.proc.stdin.close()  # the child shuts every node down
                self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.terminate()
            self.proc.wait(60)
        finally:
            self._reader.join(10)
            shutil.rmtree(self.tmp, ignore_errors=True)


@pytest.fixture
def node_cluster(tmp_path):
    cluster = NodeCluster(WORKERS, tmp_path / "cluster.log")
    try:
        yield cluster
    finally:
        cluster.close()


@pytest.mark.timeout(600)  # the first test to use reference_run also pays for it
def test_losing_a_worker_node_mid_run_resumes_bitwise_identical(
    reference_run,
    node_cluster,
    run_bucket,
    demo_data,
    run_location,
    chaos_store,
    tmp_path,
    rng,
    scenario,
):
    rec = scenario("worker node lost (raylet, object store, workers)")
    name = "nodeloss"
    loc = run_location(name)
    overrides = R.tiny_overrides(
        name=name,
        storage=f"s3://{run_bucket}/runs",
        data=demo_data,
        local_dir=tmp_path,
        steps=STEPS,
        max_failures=1,
    )
    target = rng.randint(3, STEPS // 2)  # early enough that most of the run comes after the loss
    log = tmp_path / "launch.log"
    log.touch()
    stream, stop = H.StepStream(), threading.Event()
    env = {**chaos_store.env(), **node_cluster.env}
    launched = time.time()
    proc = R.launcher(overrides, node_cluster.address, env, log)
    follower = H.follow_file(log, stream, stop)
    try:
        with H.hold_at_step(tmp_path, name, target, WORKERS, launched - 1, set()) as held:
            assert held.step < STEPS, f"held at step {held.step}, the run's last"
            hosts = {rank: node_cluster.node_of(pid) for rank, pid in held.pids.items()}
            assert sorted(hosts.values()) == sorted(n["id"] for n in node_cluster.nodes), (
                f"expected one worker per worker node, got {hosts}"
            )
            rank = rng.choice(sorted(held.pids))
            committed_before = H.committed_steps(loc)
            lost_wall = time.time()
            killed = node_cluster.remove(hosts[rank])
            lost_at = time.monotonic()
            assert held.pids[rank] in killed, f"rank {rank}'s worker was not on the removed node"
        survivor = next(n["id"] for n in node_cluster.nodes if n["id"] != hosts[rank])
        node_cluster.nodes = [n for n in node_cluster.nodes if n["id"] == survivor]
        node_cluster.nodes.append(node_cluster.add())
        # The restarted group, held before its first step: one worker on each live node.
        with H.hold_workers_at_start(tmp_path, name, WORKERS, started_after=lost_wall) as group:
            placed = sorted(node_cluster.node_of(pid) for pid in group.pids.values())
        rc = proc.wait(timeout=300)
    finally:
        stop.set()
        follower.join(5)
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    text = log.read_text(errors="replace")
    assert rc == 0, f"launcher exit {rc}:\n{text[-3000:]}"
    assert placed == sorted(n["id"] for n in node_cluster.nodes), (
        f"the restarted workers ran on {placed}, not on the surviving and the new node"
    )
    assert len(stream.resumes) == 1, text[-3000:]
    ((t_resume, resumed),) = stream.resumes
    final_committed = H.committed_steps(loc)
    assert resumed >= max(committed_before, default=0), (
        f"resumed from {resumed} but {committed_before} were committed before the node was lost"
    )
    assert resumed in final_committed
    assert set(committed_before) <= set(final_committed), "a committed checkpoint disappeared"
    reached = H.steps_reached_per_attempt(tmp_path, name)
    assert len(reached) == 2 and reached[0] == held.step, (
        f"rank 0 logged {reached} per attempt, held at {held.step}"
    )
    assert STEPS in final_committed and reached[-1] == STEPS, (final_committed, reached)
    nxt = stream.first_step_after(t_resume, above=resumed) or stream.steps[-1]
    rec.trial(
        True,
        steps_lost=held.step - resumed,
        recover_s=nxt[0] - lost_at,
        note=f"rank {rank}'s node at step {held.step}",
    )
    diffs = R.bitwise_differences(R.checkpoint_tensors(loc, STEPS), reference_run["final"])
    assert not diffs, f"{len(diffs)} tensors differ from the uninterrupted run, e.g. {diffs[:5]}"
