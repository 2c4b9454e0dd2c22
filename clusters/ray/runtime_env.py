"""Prints the runtime_env (JSON) for `ray job submit` of a ctm-dist launcher; secrets stay out of it.

    python clusters/ray/runtime_env.py --credentials-file ~/.ctm-dist/s3-credentials > env.json
    ray job submit --address http://HEAD:8265 --working-dir . \
        --runtime-env-json "$(cat env.json)" -- python launch/imagenet.py ...

Ray writes a job's runtime_env in plain text to every node's runtime_env_agent.log and shows it in
the dashboard's job list, and `--runtime-env-json` sits on the submitting command line: none of
them may hold a secret. The runtime_env therefore carries the working_dir excludes (Ray caps the
upload; .gitignore'd paths are left out too) and only the S3 settings that are not secret:
AWS_ENDPOINT_URL, AWS_REGION / AWS_DEFAULT_REGION, AWS_PROFILE and AWS_SHARED_CREDENTIALS_FILE.

The keys reach the driver and the training workers through an AWS shared-credentials file, which
botocore (under s3fs) reads by itself. `--credentials-file PATH` writes the keys of this shell
(AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN) there with mode 0600, or, without
them in this shell, checks that PATH exists and is readable by its owner only. PATH must be
the same on every node (a shared home, or put there by whoever runs the nodes). Where the nodes
have the keys already (their own environment, an instance role, a Kubernetes Secret), use
--no-credentials: then no AWS_* variable goes into the runtime_env at all.
"""

import argparse
import json
import os
import stat
import sys
import tempfile
from pathlib import Path

# Never uploaded: history, data, local runs and scratch, caches. Patterns match as in .gitignore:
# a leading "/" anchors a name at the checkout's top, so that ctm_dist/data (code) is uploaded.
EXCLUDES = [
    ".git",
    "/data",
    "/runs",
    ".ctm-dist",
    "/out",
    "**/__pycache__",
    "*.egg-info",
    ".pytest_cache",
    ".venv",
    "tests",
]
# Passed on: where and how to reach S3, never the keys.
SETTING_VARS = ("AWS_ENDPOINT_URL", "AWS_REGION", "AWS_DEFAULT_REGION", "AWS_PROFILE")
KEY_VARS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")
CREDENTIALS_FILE_VAR = "AWS_SHARED_CREDENTIALS_FILE"
# The shared-credentials file's field for each key variable (botocore's names).
FILE_FIELDS = {
    "AWS_ACCESS_KEY_ID": "aws_access_key_id",
    "AWS_SECRET_ACCESS_KEY": "aws_secret_access_key",
    "AWS_SESSION_TOKEN": "aws_session_token",
}


class CredentialsError(ValueError):
    """The credentials file cannot be used; one line."""


def write_credentials_file(path: Path, environ=os.environ) -> None:
    """The shell's keys as the [default] profile of an AWS shared-credentials file, mode 0600.

    Written to a private temporary file first and renamed, so the keys are never readable by others
    and a reader never sees half a file."""
    profile = environ.get("AWS_PROFILE") or "default"
    lines = [f"[{profile}]"] + [
        f"{field} = {environ[var]}" for var, field in FILE_FIELDS.items() if environ.get(var)
    ]
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".credentials-", dir=path.parent)  # mkstemp creates it 0600
    try:
        with os.fdopen(fd, "w") as f:
            f.write("\n".join(lines) + "\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def check_credentials_file(path: Path) -> None:
    try:
        st = path.stat()
    except OSError as e:
        raise CredentialsError(
            f"credentials file {path}: {e.strerror}; with AWS_ACCESS_KEY_ID and "
            "AWS_SECRET_ACCESS_KEY set, --credentials-file writes it"
        ) from None
    if not stat.S_ISREG(st.st_mode):
        raise CredentialsError(f"credentials file {path} is not a regular file")
    if st.st_mode & 0o077:
        raise CredentialsError(
            f"credentials file {path} is readable by others "
            f"(mode {stat.S_IMODE(st.st_mode):04o}): chmod 600 {path}"
        )


def runtime_env(
    with_credentials: bool = True,
    environ=os.environ,
    credentials_file: "str | os.PathLike | None" = None,
) -> dict:
    """The runtime_env dict; with a credentials file, the keys of ``environ`` are written to it."""
    env = {"excludes": list(EXCLUDES)}
    if not with_credentials:
        return env
    env_vars = {k: environ[k] for k in SETTING_VARS if environ.get(k)}
    path = credentials_file or environ.get(CREDENTIALS_FILE_VAR)
    if path:
        path = Path(path).expanduser().absolute()
        if (
            credentials_file
            and environ.get("AWS_ACCESS_KEY_ID")
            and environ.get("AWS_SECRET_ACCESS_KEY")
        ):
            write_credentials_file(path, environ)
        check_credentials_file(path)
        env_vars[CREDENTIALS_FILE_VAR] = str(path)
    if env_vars:
        env["env_vars"] = env_vars
    return env


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    group = ap.add_mutually_exclusive_group()
    group.add_argument(
        "--credentials-file",
        metavar="PATH",
        help="AWS shared-credentials file the job reads the keys from (written, mode 0600, "
        "from this shell's AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY when they are set)",
    )
    group.add_argument(
        "--no-credentials",
        action="store_true",
        help="no AWS_* variables at all: the nodes have their own",
    )
    args = ap.parse_args(argv)
    try:
        env = runtime_env(not args.no_credentials, credentials_file=args.credentials_file)
    except (CredentialsError, OSError) as e:
        print(f"runtime_env.py: {e}", file=sys.stderr)
        return 2
    if (
        not args.no_credentials
        and CREDENTIALS_FILE_VAR not in env.get("env_vars", {})
        and os.environ.get("AWS_SECRET_ACCESS_KEY")
    ):
        print(
            "runtime_env.py: AWS_SECRET_ACCESS_KEY is not passed to the job (Ray would log it); "
            "use --credentials-file PATH, or give the nodes the keys",
            file=sys.stderr,
        )
    json.dump(env, sys.stdout)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
