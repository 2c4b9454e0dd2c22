"""How the package's modules import each other: one-way layers, our own imports at module top,
and ``import ctm_dist`` without torch."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import ctm_dist

PACKAGE = Path(ctm_dist.__file__).parent

# Layer -> the layers it must never import. The lower layers hold no training or evaluation code.
FORBIDDEN = {
    "ctm_dist.model": ("ctm_dist.train", "ctm_dist.eval"),
    "ctm_dist.data": ("ctm_dist.train", "ctm_dist.eval"),
    "ctm_dist.storage": ("ctm_dist.train", "ctm_dist.eval"),
    "ctm_dist.losses": ("ctm_dist.train", "ctm_dist.eval"),
    "ctm_dist.inference": ("ctm_dist.train", "ctm_dist.eval"),
    "ctm_dist.compat": ("ctm_dist.train", "ctm_dist.eval"),
    "ctm_dist.tasks": ("ctm_dist.train", "ctm_dist.eval"),
    "ctm_dist.eval": ("ctm_dist.train",),
}

# Our own modules imported inside a function, and why (file -> modules).
IMPORTED_LATE = {
    "__init__.py": {"ctm_dist.eval.loading"},  # `import ctm_dist` stays light
    "storage/__init__.py": {
        "ctm_dist.storage.local"
    },  # `python -m ctm_dist.storage.local` runs it once
    "train/cli.py": {"ctm_dist.train.driver"},  # Ray: not for --help
    "eval/cli.py": {"ctm_dist.eval.report", "ctm_dist.eval.pictures"},  # matplotlib: not for --help
}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def own_imports(path: Path) -> list[tuple[str, bool]]:
    """(imported ctm_dist module, inside a function?) for every import statement of ``path``."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    tree = ast.parse(path.read_text(), str(path))
    late = {
        id(n)
        for f in ast.walk(tree)
        if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
        for n in ast.walk(f)
    }
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            targets = [base]
        else:
            continue
        found += [
            (t, id(node) in late) for t in targets if t == "ctm_dist" or t.startswith("ctm_dist.")
        ]
    return found


def sources() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def test_lower_layers_never_import_upper_ones():
    wrong = []
    for path in sources():
        name = module_name(path)
        for layer, forbidden in FORBIDDEN.items():
            if name == layer or name.startswith(layer + "."):
                wrong += [
                    f"{name} imports {t}"
                    for t, _ in own_imports(path)
                    if any(t == f or t.startswith(f + ".") for f in forbidden)
                ]
    assert not wrong


def test_own_modules_are_imported_at_module_top():
    late = []
    for path in sources():
        allowed = IMPORTED_LATE.get(path.relative_to(PACKAGE).as_posix(), set())
        late += [
            f"{module_name(path)}: {t}"
            for t, inside in own_imports(path)
            if inside and not any(t == a or t.startswith(a + ".") for a in allowed)
        ]
    assert not late, "import these at the top of the module (or say in IMPORTED_LATE why not)"


def test_relative_imports_resolve_to_modules():
    """The checks above see relative imports under their real names."""
    names = {t for t, _ in own_imports(PACKAGE / "eval" / "evaluate.py")}
    assert {"ctm_dist.eval.loading", "ctm_dist.eval.inputs"} <= names


def test_import_ctm_dist_leaves_torch_out():
    code = "import sys, ctm_dist; print(sorted(m for m in ('torch', 'ray', 'deepspeed') if m in sys.modules))"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    assert out.strip() == "[]"
