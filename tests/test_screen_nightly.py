"""The nightly entry point refuses to start while another run holds the folder (exit 3)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from pdd_batch.runs.state import run_lock

REPO = Path(__file__).resolve().parents[1]


def test_nightly_exits_3_while_the_folder_is_locked(tmp_path: Path) -> None:
    archive = tmp_path / "archive"
    archive.mkdir()
    out = tmp_path / "out"
    with run_lock(out):
        proc = subprocess.run(
            [sys.executable, "-m", "jobs.nightly", str(archive), "--out", str(out)],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=120,
        )
    assert proc.returncode == 3, proc.stderr[-2000:]
    assert "another run" in proc.stderr
    assert not (out / "manifest.json").exists()  # nothing was started or written
