"""bench/step.py end to end on CPU with a tiny model: the markdown table it prints.

The reference comparison (``--reference DIR``) runs only where a checkout of the reference is
named by ``CTM_REFERENCE``; CI has none.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
import step  # noqa: E402

TINY = [
    "--iterations",
    "2",
    "--batch",
    "2",
    "--image-size",
    "16",
    "--steps",
    "1",
    "--set",
    "d_model=32",
    "--set",
    "d_input=16",
    "--set",
    "heads=2",
    "--set",
    "n_synch_out=16",
    "--set",
    "n_synch_action=16",
    "--set",
    "memory_length=3",
    "--set",
    "memory_hidden_dims=2",
]
COLUMNS = step.COLUMNS  # the table's columns, checked below by name


def _table(output: str) -> list[list[str]]:
    rows = [
        [cell.strip() for cell in line.strip().strip("|").split("|")]
        for line in output.splitlines()
        if line.startswith("|")
    ]
    assert rows and all(len(row) == len(COLUMNS) for row in rows), output
    return rows


def test_step_smoke_prints_one_row_per_variant(capsys):
    step.main(
        [
            "--device",
            "cpu",
            "--preset",
            "demo",
            "--dtype",
            "fp32,bf16p",
            "--checkpointing",
            "0,nlms",
            *TINY,
        ]
    )
    header, rule, *rows = _table(capsys.readouterr().out)
    assert header == COLUMNS
    assert rule[0] == "---" and rule[5] == "---:"
    assert [(r[2], r[4]) for r in rows] == [
        ("fp32", "-"),
        ("fp32", "nlms"),
        ("bf16p", "-"),
        ("bf16p", "nlms"),
    ]
    for row in rows:
        values = dict(zip(COLUMNS, row))
        assert (
            values["case"] == "demo b2 16px T=2"
            and values["model"] == "ours"
            and values["compile"] == "off"
        )
        assert (
            float(values["step s"]) > 0
            and float(values["samples/s"]) > 0
            and float(values["GFLOP"]) > 0
        )
        assert (
            float(values["warm-up s"]) > 0
            and float(values["held MB"]) >= 0
            and float(values["peak MB"]) > 0
        )
    assert rows[0][-2:] == ["-", "-"]  # the baseline row
    assert all(r[-1] == "ours fp32 eager" and r[-2].endswith("x") for r in rows[1:])


def test_step_rejects_unknown_dtype_and_config_field():
    with pytest.raises(SystemExit):
        step.main(["--preset", "demo", "--dtype", "fp16"])
    with pytest.raises(SystemExit, match="FIELD"):
        step.main(["--preset", "demo", "--set", "d_modle=32", *TINY])


@pytest.mark.skipif(
    not os.environ.get("CTM_REFERENCE"), reason="no reference checkout (set CTM_REFERENCE)"
)
def test_step_against_the_reference(capsys):
    step.main(
        ["--device", "cpu", "--preset", "demo", "--reference", os.environ["CTM_REFERENCE"], *TINY]
    )
    _, _, *rows = _table(capsys.readouterr().out)
    assert [r[1] for r in rows] == ["ours", "reference"]
    assert rows[0][-1] == "reference fp32" and rows[0][-2].endswith("x")
