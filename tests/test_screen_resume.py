"""A screening driver killed mid-run (SIGKILL) and started again finishes with no gaps and no
duplicates; committed series are not redone."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from dicom_factory import write_ct_series
from screen_support import direct_scores, make_checkpoint

REPO = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.ray, pytest.mark.slow]


def _start(archive: Path, out: Path, ckpt: Path) -> subprocess.Popen:
    cmd = [
        sys.executable,
        "-m",
        "jobs.entry_screen",
        str(archive),
        "--out",
        str(out),
        "--model",
        str(ckpt),
        "--num-cpus",
        "2",
        "--batch-size",
        "2",
        "--rows-per-file",
        "4",
        "--flush-seconds",
        "0.2",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # token auth: the session test token
    return subprocess.Popen(
        cmd,
        cwd=REPO,
        env=env,
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )


def _kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL the driver and the local Ray processes it started (its own session)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(timeout=60)


def _committed_parts(out: Path) -> int:
    """Parts the run store records as committed (read-only, while the run writes)."""
    db = out / "_state" / "run.db"
    if not db.is_file():
        return 0
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5) as conn:
            q = "SELECT COUNT(*) FROM files WHERE tbl = 'slices' AND state != 'retired'"
            return int(conn.execute(q).fetchone()[0])
    except sqlite3.Error:
        return 0


def test_driver_killed_mid_run_resumes_without_gaps_or_duplicates(tmp_path: Path) -> None:
    archive = tmp_path / "archive"
    for i in range(10):
        write_ct_series(archive / f"s{i:02d}", n_slices=4, rows=32, cols=32, seed=200 + i)
    ckpt = make_checkpoint(tmp_path / "ckpt")
    out = tmp_path / "out"
    proc = _start(archive, out, ckpt)
    try:
        deadline = time.monotonic() + 240
        while _committed_parts(out) < 2 and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert proc.poll() is None, f"run ended before it could be killed: {proc.stderr.read()}"
    finally:
        _kill_group(proc)
    m = json.loads((out / "manifest.json").read_text())
    assert m["status"] == "running"  # killed: the manifest never got a final status
    done_before = _committed_parts(out)

    resumed = _start(archive, out, ckpt)
    try:
        _, err = resumed.communicate(timeout=300)
    finally:
        _kill_group(resumed)
    assert resumed.returncode == 0, err[-3000:]
    m = json.loads((out / "manifest.json").read_text())
    assert m["status"] == "complete" and m["inputs_lost"] == 0
    assert m["inputs_scored"] == m["inputs_seen"] == 40
    assert m["series_reused"] >= 1 and done_before >= 2  # committed work was not redone
    slices = pq.read_table(out / "slices").to_pandas()
    assert slices["slice_key"].is_unique  # no duplicates
    ref = direct_scores(archive, ckpt)
    assert set(slices["slice_key"]) == set(ref)  # no gaps
    assert not [p for p in (out / "slices").iterdir() if p.name.startswith(".")]  # no temp left
