"""A clean clone has no ../shared and no Ray default temp folder: the tests that behave
differently there are marked ``fallback``, and CI (``.ci/run``) runs them a second time that way."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# A module that reads conftest's SHARED itself (instead of shared_path, which skips) falls back
# to data of its own where ../shared is absent.
USES_SHARED = re.compile(r"^from conftest import .*\bSHARED\b", re.MULTILINE)


def _readme_test_command() -> str:
    readme = (REPO / "README.md").read_text()
    block = re.search(r"Run the tests:\s*```bash\n(.+?)\n```", readme, re.DOTALL)
    assert block, "README has no 'Run the tests:' block"
    return block.group(1).strip()


def test_every_module_with_a_shared_fallback_is_marked_fallback() -> None:
    modules = [
        p for p in sorted((REPO / "tests").glob("test_*.py")) if USES_SHARED.search(p.read_text())
    ]
    assert modules  # the check sees the modules it is about
    unmarked = [p.name for p in modules if "pytest.mark.fallback" not in p.read_text()]
    assert not unmarked, f"modules with a ../shared fallback but no fallback marker: {unmarked}"


def test_ci_runs_the_readme_command_then_the_fallback_tests_on_a_clean_clone() -> None:
    lines = (REPO / ".ci" / "run").read_text().replace("\\\n", " ").splitlines()
    commands = [
        line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")
    ]
    readme = _readme_test_command()
    assert readme in commands
    passes = [shlex.split(c) for c in commands if "pytest" in c and "fallback" in c]
    assert len(passes) == 1 and commands.index(readme) < commands.index(
        next(c for c in commands if "pytest" in c and "fallback" in c)
    )
    words = passes[0]
    env = dict(w.split("=", 1) for w in words if "=" in w and not w.startswith("-"))
    assert {"PDD_SHARED", "TMPDIR"} <= set(env)  # ../shared hidden, Ray's default temp absent
    after_pytest = words[words.index("pytest") + 1 :]
    assert after_pytest[after_pytest.index("-m") + 1].startswith("fallback")
