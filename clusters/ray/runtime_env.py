"""Prints the runtime_env (JSON) for `ray job submit` of a ctm-dist launcher.

    ray job submit --address http://HEAD:8265 --working-dir . \
        --runtime-env-json "$(python clusters/ray/runtime_env.py)" -- python launch/imagenet.py ...

It keeps the upload small (Ray caps the working_dir package; .gitignore'd paths are left out
too) and passes this shell's S3 settings (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, ...) to the job,
whose driver hands them on to the training workers. Anyone who can read the cluster's job list
sees these values: where the cluster's nodes already carry the variables (a Kubernetes Secret,
the Slurm job's environment), use --no-credentials.
"""

import argparse
import json
import os
import sys

# Never uploaded: history, data, local runs and scratch, caches.
EXCLUDES = [".git", "data", "runs", ".ctm-dist", "out", "**/__pycache__", "*.egg-info",
            ".pytest_cache", ".venv", "tests"]
CREDENTIAL_VARS = ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN",
                   "AWS_REGION", "AWS_DEFAULT_REGION")


def runtime_env(with_credentials: bool = True, environ=os.environ) -> dict:
    env = {"excludes": list(EXCLUDES)}
    if with_credentials:
        env_vars = {k: environ[k] for k in CREDENTIAL_VARS if environ.get(k)}
        if env_vars:
            env["env_vars"] = env_vars
    return env


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--no-credentials", action="store_true", help="leave the AWS_* variables out")
    args = ap.parse_args(argv)
    json.dump(runtime_env(not args.no_credentials), sys.stdout)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
