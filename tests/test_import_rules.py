"""The import table of DESIGN.md: import-linter contracts (static, lazy imports too) and what a
fresh interpreter actually loads for the CLI and ``import model``."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

PACKAGES = ("pdd_batch", "model", "jobs")


def _lint_imports(root: Path) -> subprocess.CompletedProcess[str]:
    """Run import-linter on the packages under ``root`` with the repository's contracts."""
    code = "import sys\nfrom importlinter.cli import lint_imports\nsys.exit(lint_imports())"
    env = {**os.environ, "PYTHONPATH": str(root)}
    return subprocess.run(
        [sys.executable, "-c", code], cwd=root, env=env, capture_output=True, text=True
    )


def _modules_loaded_by(code: str) -> set[str]:
    probe = code + "\nimport sys, json\nprint(json.dumps(sorted(sys.modules)))"
    out = subprocess.run(
        [sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, check=True
    )
    return {m.split(".")[0] for m in json.loads(out.stdout.strip().splitlines()[-1])}


def test_import_linter_contracts_are_kept() -> None:
    """The DESIGN.md table and the cli > review > runs > ingest layers (pyproject contracts)."""
    res = _lint_imports(REPO)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-2000:]
    assert "0 broken" in res.stdout


def _copy_project(dest: Path) -> None:
    for pkg in PACKAGES:
        shutil.copytree(REPO / pkg, dest / pkg, ignore=shutil.ignore_patterns("*.safetensors"))
    shutil.copy(REPO / "pyproject.toml", dest / "pyproject.toml")


@pytest.mark.parametrize(
    ("module", "line", "contract"),
    [
        ("pdd_batch/ingest/keys.py", "import torch", "without torch, Ray"),
        ("pdd_batch/ingest/keys.py", "from pdd_batch.runs import schema", "layers"),
        ("pdd_batch/evaluation/metrics.py", "from pdd_batch.review import deid", "apart"),
        ("model/loss.py", "import pydicom", "pure PyTorch"),
        ("jobs/resources.py", "import rich", "no CLI"),
    ],
)
def test_import_linter_fails_on_a_forbidden_import(
    tmp_path: Path, module: str, line: str, contract: str
) -> None:
    """A copy of the project with one forbidden import breaks the named contract."""
    _copy_project(tmp_path)
    target = tmp_path / module
    target.write_text(target.read_text() + f"\n{line}  # noqa\n")
    res = _lint_imports(tmp_path)
    assert res.returncode != 0
    broken = [ln for ln in res.stdout.splitlines() if ln.endswith("BROKEN")]
    assert len(broken) == 1 and contract in broken[0], res.stdout[-2000:]


def test_cli_app_loads_neither_torch_nor_ray() -> None:
    loaded = _modules_loaded_by("import pdd_batch.cli.app")
    assert "torch" not in loaded and "ray" not in loaded


def test_cli_help_runs_fast_without_torch() -> None:
    code = (
        "import sys\nfrom pdd_batch.cli.app import app\n"
        "try:\n    app(['--help'])\nexcept SystemExit:\n    pass\n"
    )
    loaded = _modules_loaded_by(code)
    assert "torch" not in loaded and "ray" not in loaded


def test_model_imports_without_optional_packages() -> None:
    loaded = _modules_loaded_by("import model")
    assert not {"ray", "pydicom", "mamba_ssm"} & loaded


def test_tests_start_ray_only_the_way_the_project_does() -> None:
    """Every test cluster goes through tests/ray_support.py (token auth, 127.0.0.1, private temp
    folder): no test calls ``ray.init`` or builds a ``Cluster`` without its node arguments."""
    offenders = []
    for path in sorted((REPO / "tests").glob("*.py")):
        if path.name in ("ray_support.py", "test_import_rules.py"):
            continue
        text = path.read_text()
        if "ray.init(" in text or ("Cluster(" in text and "ray_node_args" not in text):
            offenders.append(path.name)
    assert not offenders, f"tests starting Ray outside ray_support: {offenders}"
