"""A multi-node Ray cluster on this machine (``ray.cluster_utils.Cluster``) in a process of its own,
for the node-loss scenario: ``python cluster_child.py NODES``, driven by JSON lines on stdin,
answering with ``CLUSTER {json}`` lines on stdout.

Every node is a real raylet (which holds the node's object store) with its own worker processes.
The head has no CPUs and the ``NODES`` worker nodes one CPU each, so a run's Ray Train workers
(one CPU each) land one per worker node, while the driver, Ray Train's controller and the run's
progress actor stay on the head. The cluster lives in this separate process because ``Cluster``
keeps process-wide Ray state (and resets part of it when it shuts down) that would disturb the
chaos suite's shared Ray session in the pytest process. Its temp dir (sessions, sockets, the
``ray_current_cluster`` address file) is ``$RAY_TMPDIR``, a private folder the test chooses, so
nothing of it lands in ``/tmp/ray``.

Answers: ``up`` (``address``, ``nodes``: ``[{"id", "raylet"}]`` of the worker nodes) once every
node is registered. Commands: ``{"op": "remove", "node": ID}`` kills that worker node at once:
its raylet is frozen (so it starts nothing more), every process it started (workers, held or idle,
and its agents) is SIGKILLed and the raylet itself is SIGKILLed by
``Cluster.remove_node(allow_graceful=False)``; answer ``removed`` with the ``killed`` pids.
``{"op": "add"}`` adds a 1-CPU worker node; answer ``added`` with its ``node``. End of stdin:
every node is shut down, answer ``down``.
"""

from __future__ import annotations

import json
import signal
import sys

import psutil
from ray.cluster_utils import Cluster


def answer(kind: str, **fields) -> None:
    print("CLUSTER " + json.dumps({"kind": kind, **fields}), flush=True)


def describe(node) -> dict:
    return {"id": node.node_id, "raylet": node.all_processes["raylet"][0].process.pid}


def add(cluster: Cluster):
    return cluster.add_node(num_cpus=1)


def remove(cluster: Cluster, node) -> list[int]:
    """SIGKILL a worker node's raylet and everything it started; the pids killed besides it."""
    raylet = psutil.Process(describe(node)["raylet"])
    raylet.suspend()  # no new worker between the listing below and the kill
    started = raylet.children(recursive=True)
    for p in started:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    cluster.remove_node(node, allow_graceful=False)
    psutil.wait_procs(started, timeout=30)
    return [p.pid for p in started]


def main(workers: int) -> None:
    cluster = Cluster(
        initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False}
    )
    try:
        nodes = {}
        for _ in range(workers):
            node = add(cluster)
            nodes[node.node_id] = node
        cluster.wait_for_nodes()
        answer("up", address=cluster.address, nodes=[describe(n) for n in nodes.values()])
        for line in sys.stdin:
            cmd = json.loads(line)
            if cmd["op"] == "remove":
                killed = remove(cluster, nodes.pop(cmd["node"]))
                answer("removed", node=cmd["node"], killed=killed)
            elif cmd["op"] == "add":
                node = add(cluster)
                cluster.wait_for_nodes()
                nodes[node.node_id] = node
                answer("added", node=describe(node))
            else:
                raise ValueError(f"unknown command {cmd!r}")
    finally:
        cluster.shutdown()
        answer("down")


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))  # shut the nodes down on SIGTERM too
    main(int(sys.argv[1]))
