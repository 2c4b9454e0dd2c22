"""Writes KubeRay manifests for ctm-dist: a RayJob for one training run, a RayCluster to submit to.

    python clusters/kubernetes/generate.py rayjob --image REGISTRY/ctm-dist:TAG \\
        --data s3://bucket/imagenet --storage s3://bucket/runs --name imagenet-run1 \\
        --workers 4 --gpus-per-worker 8 > rayjob.yaml
    kubectl apply -f rayjob.yaml

Kinds: `rayjob` (ServiceAccount + RayJob), `raycluster` (ServiceAccount + RayCluster for
`ray job submit`). Launcher arguments after `--` are passed through, e.g.
`-- --zero-stage 2 --precision bf16 model.iterations=50`. `--config-file train.yaml` puts a
training config in a ConfigMap, mounted on the head and passed as the launcher's --config.

Pods read the S3 endpoint and keys from a Secret (--s3-secret, keys AWS_ENDPOINT_URL,
AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_REGION) through secretKeyRef; no credential
ever appears in a manifest. `--workers` counts worker pods; each pod runs `--gpus-per-worker`
Ray Train workers of one GPU each. Pods get terminationGracePeriodSeconds = the launcher's
preemption grace (run.preemption_grace_s, default from the training config) + 30 s, so that a
preemption checkpoint commits before the kubelet's SIGKILL; containers drop all capabilities and
run under the RuntimeDefault seccomp profile. The RayJob's retries (backoffLimit) relaunch the same
command with the same run name, so each retry resumes from the newest committed checkpoint.
"""

from __future__ import annotations

import argparse
import math
import shlex
import sys
from dataclasses import dataclass, field

import yaml

from ctm_dist.tasks import get_task, task_names
from ctm_dist.train.config import RunSection

TASKS = tuple(name for name in task_names() if name != "demo")  # those with a launcher
S3_KEYS = (  # (variable, optional)
    ("AWS_ENDPOINT_URL", True),
    ("AWS_ACCESS_KEY_ID", False),
    ("AWS_SECRET_ACCESS_KEY", False),
    ("AWS_REGION", True),
)
APP_DIR = "/opt/ctm-dist"  # where the Dockerfile puts the project
APP_UID = 1000  # the Dockerfile's non-root user
CONFIG_DIR = "/etc/ctm-dist"
GRACE_OVERRIDE = "run.preemption_grace_s="
# Time beyond the preemption grace before the kubelet's SIGKILL: Ray's own shutdown after the commit.
KILL_MARGIN_S = 30


@dataclass
class Params:
    """Everything the manifests depend on."""

    name: str = "ctm-imagenet"
    task: str = "imagenet"
    image: str = "registry.example.com/ctm-dist:0.1.0"
    namespace: str | None = None
    data: str = "s3://ctm-data/imagenet"
    storage: str = "s3://ctm-runs"
    s3_secret: str = "ctm-s3"
    workers: int = 2
    gpus_per_worker: int = 8
    cpus_per_worker: int = 32
    memory_per_worker: str = "256Gi"
    head_cpus: int = 4
    head_memory: str = "16Gi"
    shm_size: str = "32Gi"
    backoff_limit: int = 5
    ray_version: str = "2.60.0"
    auth: str = "token"
    config_file: str | None = None
    launcher_args: list[str] = field(default_factory=list)

    def check(self) -> None:
        if self.task not in TASKS:
            raise ValueError(f"task must be one of {TASKS}, not {self.task!r}")
        for attr in ("workers", "cpus_per_worker", "head_cpus"):
            if getattr(self, attr) < 1:
                raise ValueError(f"{attr} must be at least 1")
        if self.gpus_per_worker < 0 or self.backoff_limit < 0:
            raise ValueError("gpus_per_worker and backoff_limit cannot be negative")
        if self.auth not in ("token", "disabled"):
            raise ValueError("auth is 'token' or 'disabled'")
        try:
            grace = self.preemption_grace_s
        except ValueError:
            raise ValueError(f"{GRACE_OVERRIDE}... must be a number of seconds") from None
        if not grace > 0:
            raise ValueError(f"{GRACE_OVERRIDE}... must be > 0")

    @property
    def preemption_grace_s(self) -> float:
        """The launcher's preemption grace: its `run.preemption_grace_s=` argument or the config default."""
        given = [
            a[len(GRACE_OVERRIDE) :] for a in self.launcher_args if a.startswith(GRACE_OVERRIDE)
        ]
        return float(given[-1]) if given else RunSection.preemption_grace_s

    @property
    def termination_grace_s(self) -> int:
        """The pods' terminationGracePeriodSeconds: a preemption checkpoint must fit before SIGKILL."""
        return math.ceil(self.preemption_grace_s) + KILL_MARGIN_S

    @property
    def train_workers(self) -> int:
        return self.workers * max(self.gpus_per_worker, 1)


def _metadata(p: Params, name: str) -> dict:
    meta = {
        "name": name,
        "labels": {"app.kubernetes.io/name": "ctm-dist", "app.kubernetes.io/instance": p.name},
    }
    if p.namespace:
        meta["namespace"] = p.namespace
    return meta


def _s3_env(p: Params) -> list[dict]:
    return [
        {
            "name": var,
            "valueFrom": {
                "secretKeyRef": {
                    "name": p.s3_secret,
                    "key": var,
                    **({"optional": True} if optional else {}),
                }
            },
        }
        for var, optional in S3_KEYS
    ]


def _pod_template(
    p: Params, container: str, cpus: int, memory: str, gpus: int, ports: list[dict] | None = None
) -> dict:
    limits = {"cpu": str(cpus), "memory": memory}
    if gpus:
        limits["nvidia.com/gpu"] = str(gpus)
    spec = {
        "serviceAccountName": p.name,
        "automountServiceAccountToken": False,
        "terminationGracePeriodSeconds": p.termination_grace_s,
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": APP_UID,
            "runAsGroup": APP_UID,
            "fsGroup": APP_UID,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "containers": [
            {
                "name": container,
                "image": p.image,
                "imagePullPolicy": "IfNotPresent",
                "workingDir": APP_DIR,
                "env": _s3_env(p),
                "resources": {"requests": dict(limits), "limits": limits},
                "securityContext": {
                    "allowPrivilegeEscalation": False,
                    "capabilities": {"drop": ["ALL"]},
                },
                # Ray's object store and PyTorch's data loader workers need a large /dev/shm.
                "volumeMounts": [{"name": "dshm", "mountPath": "/dev/shm"}],
            }
        ],
        "volumes": [{"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": p.shm_size}}],
    }
    if ports:
        spec["containers"][0]["ports"] = ports
    if gpus:
        spec["tolerations"] = [
            {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
        ]
    return {"spec": spec}


def _cluster_spec(p: Params) -> dict:
    head_ports = [
        {"name": "gcs-server", "containerPort": 6379},
        {"name": "dashboard", "containerPort": 8265},
        {"name": "client", "containerPort": 10001},
    ]
    head = _pod_template(p, "ray-head", p.head_cpus, p.head_memory, 0, head_ports)
    if p.config_file:  # the driver, on the head, reads the training config
        head["spec"]["volumes"].append(
            {"name": "config", "configMap": {"name": f"{p.name}-config"}}
        )
        head["spec"]["containers"][0]["volumeMounts"].append(
            {"name": "config", "mountPath": CONFIG_DIR, "readOnly": True}
        )
    spec = {
        "rayVersion": p.ray_version,
        "headGroupSpec": {
            # The head runs the driver only; training workers go to the worker pods.
            "rayStartParams": {"num-cpus": "0"},
            "template": head,
        },
        "workerGroupSpecs": [
            {
                "groupName": "gpu" if p.gpus_per_worker else "cpu",
                "replicas": p.workers,
                "minReplicas": p.workers,
                "maxReplicas": p.workers,
                "rayStartParams": {},
                "template": _pod_template(
                    p, "ray-worker", p.cpus_per_worker, p.memory_per_worker, p.gpus_per_worker
                ),
            }
        ],
    }
    spec["authOptions"] = {"mode": p.auth}
    return spec


def entrypoint(p: Params) -> str:
    """The launcher command; the same on every retry, so retries resume the run."""
    args = [
        "python",
        f"launch/{p.task}.py",
        "--name",
        p.name,
        "--storage",
        p.storage,
        "--workers",
        str(p.train_workers),
        "--gpus-per-worker",
        "1" if p.gpus_per_worker else "0",
    ]
    if not get_task(p.task).generated_data:  # no shard set to read
        args[4:4] = ["--data", p.data]
    if p.config_file:
        args += ["--config", f"{CONFIG_DIR}/config.yaml"]
    return shlex.join(args + list(p.launcher_args))


def service_account(p: Params) -> dict:
    return {
        "apiVersion": "v1",
        "kind": "ServiceAccount",
        "metadata": _metadata(p, p.name),
        "automountServiceAccountToken": False,
    }


def config_map(p: Params) -> dict:
    with open(p.config_file) as f:
        text = f.read()
    yaml.safe_load(text)  # fail here, not in the pod, on a malformed file
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": _metadata(p, f"{p.name}-config"),
        "data": {"config.yaml": text},
    }


def ray_job(p: Params) -> dict:
    return {
        "apiVersion": "ray.io/v1",
        "kind": "RayJob",
        "metadata": _metadata(p, p.name),
        "spec": {
            "entrypoint": entrypoint(p),
            "backoffLimit": p.backoff_limit,
            "shutdownAfterJobFinishes": True,
            "ttlSecondsAfterFinished": 3600,
            "rayClusterSpec": _cluster_spec(p),
        },
    }


def ray_cluster(p: Params) -> dict:
    return {
        "apiVersion": "ray.io/v1",
        "kind": "RayCluster",
        "metadata": _metadata(p, p.name),
        "spec": _cluster_spec(p),
    }


def render(kind: str, p: Params) -> list[dict]:
    """The objects for one kind, in the order to apply them."""
    p.check()
    first = [service_account(p)] + ([config_map(p)] if p.config_file else [])
    if kind == "rayjob":
        return first + [ray_job(p)]
    if kind == "raycluster":
        return first + [ray_cluster(p)]
    raise ValueError(f"kind must be 'rayjob' or 'raycluster', not {kind!r}")


def to_yaml(objects: list[dict]) -> str:
    return yaml.safe_dump_all(objects, sort_keys=False, default_flow_style=False)


def parse_args(argv: list[str]) -> tuple[str, Params]:
    if "--" in argv:
        i = argv.index("--")
        argv, launcher_args = argv[:i], argv[i + 1 :]
    else:
        launcher_args = []
    d = Params()
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("kind", choices=("rayjob", "raycluster"))
    ap.add_argument(
        "--name", default=d.name, help="run name (also the objects' name); keep it to resume"
    )
    ap.add_argument("--task", default=d.task, choices=TASKS)
    ap.add_argument("--image", default=d.image)
    ap.add_argument("--namespace", default=d.namespace)
    ap.add_argument("--data", default=d.data, help="shard set URL")
    ap.add_argument("--storage", default=d.storage, help="where runs keep checkpoints and logs")
    ap.add_argument("--s3-secret", default=d.s3_secret, help="Secret holding the AWS_* variables")
    ap.add_argument("--workers", type=int, default=d.workers, help="worker pods")
    ap.add_argument(
        "--gpus-per-worker", type=int, default=d.gpus_per_worker, help="GPUs per worker pod"
    )
    ap.add_argument("--cpus-per-worker", type=int, default=d.cpus_per_worker)
    ap.add_argument("--memory-per-worker", default=d.memory_per_worker)
    ap.add_argument("--head-cpus", type=int, default=d.head_cpus)
    ap.add_argument("--head-memory", default=d.head_memory)
    ap.add_argument("--shm-size", default=d.shm_size)
    ap.add_argument("--backoff-limit", type=int, default=d.backoff_limit, help="RayJob retries")
    ap.add_argument("--ray-version", default=d.ray_version)
    ap.add_argument("--auth", default=d.auth, choices=("token", "disabled"), help="Ray token auth")
    ap.add_argument(
        "--config-file", default=None, help="training config YAML to ship in a ConfigMap"
    )
    a = ap.parse_args(argv)
    kind = a.kind
    del a.kind
    return kind, Params(**vars(a), launcher_args=launcher_args)


def main(argv: list[str] | None = None) -> int:
    kind, params = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        sys.stdout.write(to_yaml(render(kind, params)))
    except (ValueError, OSError, yaml.YAMLError) as e:
        print(f"generate.py: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
