"""The import table of DESIGN.md, enforced by importing each package in a fresh interpreter."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

FORBIDDEN = {
    "model": ["ray", "pydicom", "nibabel", "pyarrow", "typer", "rich", "pdd_batch", "jobs"],
    "pdd_batch": ["torch", "ray", "model", "jobs", "typer", "rich"],
    "jobs": ["typer", "rich"],
}


def _modules_loaded_by(code: str) -> set[str]:
    probe = code + "\nimport sys, json\nprint(json.dumps(sorted(sys.modules)))"
    out = subprocess.run(
        [sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, check=True
    )
    return {m.split(".")[0] for m in json.loads(out.stdout.strip().splitlines()[-1])}


def _submodules(package: str) -> list[str]:
    mods = []
    for path in sorted((REPO / package).rglob("*.py")):
        rel = path.relative_to(REPO).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        if parts[-1] == "__main__":
            continue
        mods.append(".".join(parts))
    return mods


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_package_modules_respect_import_table(package: str) -> None:
    mods = _submodules(package)
    if package == "pdd_batch":
        mods = [m for m in mods if not m.startswith("pdd_batch.cli")]
    code = "\n".join(f"import {m}" for m in mods)
    loaded = _modules_loaded_by(code)
    bad = sorted(set(FORBIDDEN[package]) & loaded)
    assert not bad, f"importing {package} modules loaded forbidden packages: {bad}"


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
