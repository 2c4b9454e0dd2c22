"""The example notebooks run top to bottom in a fresh kernel, and leave no process behind.

``01_quickstart`` trains the demo on the embedded default for a few steps (``CTM_NOTEBOOK_STEPS``),
shows its pictures and the halting table, and exports the run; ``02_inference`` loads that export,
predicts with halting and makes the pictures. Every process the kernel started (Ray, the object
store) must be gone once the notebook is done, and the kernel's shutdown must not leave any.
"""

from __future__ import annotations

import re
from pathlib import Path

import nbformat
import psutil
import pytest
from nbclient import NotebookClient

from ctm_dist.storage.local import environ

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = REPO / "examples"
NOTEBOOKS = sorted(EXAMPLES.glob("*.ipynb"))
HALTING_ROW = re.compile(r"^\s*(\d+\.\d+)\s+(\S+)\s+(\S+)\s*$", re.M)


def _run(name: str, cwd: Path, env: dict[str, str]) -> tuple[nbformat.NotebookNode, list]:
    """Execute a notebook in ``cwd`` with ``env`` added; returns it and the processes the kernel
    had started at any cell's end (kernel and processes of other jobs excluded)."""
    nb = nbformat.read(EXAMPLES / name, as_version=4)
    started: dict[int, psutil.Process] = {}
    client = NotebookClient(
        nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(cwd)}}
    )

    def note_children(**_):
        kernel = psutil.Process(client.km.provisioner.pid)
        for child in kernel.children(recursive=True):
            started.setdefault(child.pid, child)

    client.on_cell_executed = note_children
    with environ(env):
        client.execute()
    return nb, list(started.values())


def _text(cell) -> str:
    return "".join(
        o.get("text", "")
        for o in cell.get("outputs", [])
        if o.output_type == "stream" and o.name == "stdout"
    )


def _images(nb) -> int:
    return sum("image/png" in o.get("data", {}) for c in nb.cells for o in c.get("outputs", []))


def _left_behind(processes: list) -> list[str]:
    gone, alive = psutil.wait_procs(processes, timeout=10)
    return [f"{p.pid} {p.name()}" for p in alive if p.status() != psutil.STATUS_ZOMBIE]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebooks_are_kept_without_outputs(path):
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, (
                f"{path.name}: clear outputs"
            )


def test_quickstart_then_inference_run_headless_and_stop_what_they_start(tmp_path):
    assert [p.name for p in NOTEBOOKS] == ["01_quickstart.ipynb", "02_inference.ipynb"]
    env = {"CTM_NOTEBOOK_STEPS": "4", "PYTHONPATH": str(REPO)}
    nb, started = _run("01_quickstart.ipynb", tmp_path, env)
    rows = [
        (float(t), float(a), float(k))
        for c in nb.cells
        for t, a, k in HALTING_ROW.findall(_text(c))
    ]
    assert [t for t, _, _ in rows] == [0.3, 0.5, 0.7, 0.9, 1.01], rows
    for _, accuracy, ticks in rows:
        assert 0.0 <= accuracy <= 1.0 and ticks >= 1.0
    assert rows[-1][2] == max(k for _, _, k in rows)  # the full run uses the most ticks
    assert _images(nb) == 3
    for name in ("certainty_loss", "attention_0", "neurons_0", "ticks_used"):
        assert (tmp_path / "pictures-quickstart" / f"{name}.png").stat().st_size > 0
    assert (tmp_path / "export-quickstart" / "model.safetensors").is_file()
    assert _left_behind(started) == []

    env["CTM_NOTEBOOK_CHECKPOINT"] = str(tmp_path / "export-quickstart")
    _check_inference(*_run("02_inference.ipynb", tmp_path, env), "export: task demo")


def _check_inference(nb, started, first_line: str) -> None:
    text = "".join(_text(c) for c in nb.cells)
    assert text.startswith(first_line), text
    predictions = re.findall(r"class=(\d+)\ttick=(\d+)/(\d+)\tcertainty=([\d.]+)", text)
    assert len(predictions) == 8
    assert all(1 <= int(t) <= int(n) and 0 <= float(c) <= 1 for _, t, n, c in predictions)
    assert _images(nb) == 3
    assert _left_behind(started) == []


def test_inference_notebook_reads_the_reference_fixture_by_default(tmp_path):
    nb, started = _run("02_inference.ipynb", tmp_path, {"PYTHONPATH": str(REPO)})
    _check_inference(nb, started, "reference: task cifar10")
