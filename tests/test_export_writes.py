"""`pdd-batch export` writes: atomic, private whatever the umask, and a failed write (a full disk)
is reported as a write error, never as an unreadable source."""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

import pytest
from run_factory import build_run
from typer.testing import CliRunner

import pdd_batch.review.export as export_mod
from pdd_batch.cli.app import app
from pdd_batch.review.export import ExportOptions, ExportWriteError, export_run
from pdd_batch.runs.results import open_run
from pdd_batch.runs.writer import write_atomic


def _disk_full_after(monkeypatch: pytest.MonkeyPatch, n_ok: int) -> list[Path]:
    """Exported files after the first ``n_ok`` hit a full disk half-way through their write."""
    written: list[Path] = []

    def write(data: bytes, dst: Path) -> Path:
        written.append(dst)
        if len(written) <= n_ok:
            return write_atomic(dst, lambda fh: fh.write(data))

        def half_then_full(fh) -> None:
            fh.write(data[: len(data) // 2])
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(dst))

        return write_atomic(dst, half_then_full)

    monkeypatch.setattr(export_mod, "write_bytes_atomic", write)
    return written


def test_a_full_disk_is_a_write_error_and_leaves_no_partial_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run = build_run(tmp_path / "base")
    out = tmp_path / "out"
    written = _disk_full_after(monkeypatch, n_ok=2)
    with pytest.raises(ExportWriteError) as info:
        export_run(open_run(run.run_dir), out, ExportOptions())
    msg = str(info.value)
    assert msg.startswith("cannot write ") and "No space left on device (ENOSPC)" in msg
    assert "read" not in msg and str(tmp_path) not in msg
    assert len(written) == 3  # stopped at the first failed write
    files = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(out).as_posix() for p in written[:2])  # no temp left


def test_export_command_names_the_write_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run = build_run(tmp_path / "base")
    _disk_full_after(monkeypatch, n_ok=0)
    res = CliRunner().invoke(app, ["export", str(run.run_dir), "--out", str(tmp_path / "out")])
    assert res.exit_code == 2
    assert "cannot write" in res.output and "No space left on device" in res.output
    assert "cannot read" not in res.output


def test_export_folder_is_private_under_umask_022(tmp_path: Path) -> None:
    run = build_run(tmp_path / "base")
    out = tmp_path / "exports" / "out"
    old = os.umask(0o022)
    try:
        export_run(open_run(run.run_dir), out, ExportOptions(secondary_capture=True))
    finally:
        os.umask(old)
    paths = [out, *out.rglob("*")]
    assert any(p.suffix == ".dcm" and "secondary_capture" in p.parts for p in paths)
    assert any(p.name == "export.json" for p in paths) and len(paths) > 10
    for p in paths:
        want = 0o700 if p.is_dir() else 0o600
        assert stat.S_IMODE(p.stat().st_mode) == want, p.relative_to(out)
