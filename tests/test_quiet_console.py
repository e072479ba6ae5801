"""The console of `pdd-batch screen` carries the live view and the summary, not Ray's log lines
(they go to OUT/_logs/ray.log). A real subprocess: Ray's handlers write to the process's own
stderr, which an in-process runner would not see."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from dicom_factory import write_ct_series
from screen_support import make_checkpoint

pytestmark = [pytest.mark.ray, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[1]
# Ray's Python log records ("INFO worker.py:2038 -- Started a local Ray instance."), lines
# forwarded from its raylets, logging-machinery tracebacks
# C++ lines of the core worker ("[… E …] core_worker.cc:2465: Actor …")
RAY_LINE = re.compile(
    r"\b(INFO|WARNING)\b.*(--|\.py:\d+)|\(raylet\)|logging\.cc|Logging error|\.cc:\d+:"
)


def test_screen_console_has_no_ray_log_lines(tmp_path: Path) -> None:
    """Run with ``RAY_AUTH_MODE=disabled``: the local cluster overrides it, and the console says
    so in one line (the log's warning alone would land in the run's log folder)."""
    write_ct_series(tmp_path / "arc" / "ct", n_slices=3, rows=32, cols=32, seed=1)
    ckpt = make_checkpoint(tmp_path / "ck", threshold=1.0)
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(REPO), "COLUMNS": "100", "RAY_AUTH_MODE": "disabled"}
    env.pop("RAY_ADDRESS", None)
    cmd = [sys.executable, "-m", "pdd_batch", "screen", str(tmp_path / "arc"), "--out", str(out),
           "--model", str(ckpt), "--num-cpus", "2", "--batch-size", "4"]  # fmt: skip
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=500, cwd=tmp_path)
    console = res.stdout + res.stderr
    assert res.returncode == 0, console[-3000:]
    assert "screening run" in console  # the summary is there
    noisy = [line for line in console.splitlines() if RAY_LINE.search(line)]
    assert not noisy, noisy[:5]
    override = [line for line in console.splitlines() if "RAY_AUTH_MODE=disabled ignored" in line]
    assert len(override) == 1 and override[0].startswith("warning:"), override
    log = (out / "_logs" / "ray.log").read_text()
    assert "Dataset" in log  # Ray Data's execution lines went to the run folder
