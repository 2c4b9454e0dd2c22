"""The commands a user runs after training a run: evaluate, visualize and export.

They are the eval tools' own command lines (``launch/evaluate.py`` etc., see ``eval/cli.py``), so
they are written here beside those tools; the trainer prints them at the end of a run.
"""

from __future__ import annotations

import os
import shlex
from pathlib import Path

from ctm_dist.storage.local import EMBEDDED_LOCAL_DIR
from ctm_dist.tasks import get_task


def next_commands(
    run_url: str, task: str | None = None, local_dir: str | os.PathLike | None = None
) -> list[str]:
    """The commands to run after training ``run_url``: evaluate, visualize (tasks whose pictures
    need no inputs given: image tasks, Q&A MNIST, RL) and export.

    ``local_dir`` is the trainer's ``run.local_dir`` when the run lives in its embedded store; the
    commands then name it unless it is ``./.ctm-dist``. They are meant to be run from the directory
    training ran in (the checkout)."""
    name = run_url.rstrip("/").rsplit("/", 1)[-1]
    extra = ""
    if local_dir is not None and Path(local_dir).resolve() != Path(EMBEDDED_LOCAL_DIR).resolve():
        extra = f" --local-dir {shlex.quote(os.fspath(local_dir))}"
    run = shlex.quote(run_url)
    commands = [f"python launch/evaluate.py {run} --out eval-{name}{extra}"]
    kind = get_task(task) if task is not None else None
    if kind is None or not kind.generated_data or kind.pictures_from_model:
        commands.append(f"python launch/visualize.py {run} --out pictures-{name}{extra}")
    commands.append(f"python launch/export.py {run} export-{name}{extra}")
    return commands
