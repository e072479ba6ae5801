"""The end of a screening run on a full disk, without Ray (an archive of unusable files only,
so nothing is sent to a cluster): the manifest records status "failed" with the *first* error,
free of paths; the run folder is private whatever the umask; the live view prints what a
run will replace."""

from __future__ import annotations

import errno
import json
import os
import stat
from pathlib import Path

import pytest
from dicom_factory import write_corrupt_dicom, write_non_image, write_text
from screen_support import make_checkpoint

import pdd_batch.runs.live as run_live
import pdd_batch.runs.manifest as manifest_mod
from jobs.screen import run_screen
from pdd_batch.runs.config import RunConfig
from pdd_batch.runs.writer import WriteError, write_atomic, write_json_atomic


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("ckpt") / "ckpt")


def _archive(root: Path) -> Path:
    write_text(root / "Doe^Jane" / "README.txt")
    write_corrupt_dicom(root / "Doe^Jane" / "bad.dcm")
    write_non_image(root / "Doe^Jane" / "sr.dcm", kind="SR", seed=1)
    return root


def _full_disk(final: Path, data: object = None) -> Path:
    """What a write into ``final`` does on a full disk (the project's own atomic writer)."""

    def fill(fh) -> None:
        fh.write(b"PAR1")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(fh.name))

    return write_atomic(final, fill)


def _cfg(tmp_path: Path, ckpt: Path) -> RunConfig:
    return RunConfig(archive=_archive(tmp_path / "archive"), out_dir=tmp_path / "out",
                     model_path=ckpt, num_cpus=1)  # fmt: skip


def _manifest(cfg: RunConfig) -> dict:
    return json.loads((cfg.out_dir / "manifest.json").read_text())


def test_full_disk_at_the_end_of_a_run_is_recorded_as_failed(
    tmp_path: Path, ckpt: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = _cfg(tmp_path, ckpt)
    monkeypatch.setattr(run_live, "write_tables_atomic", lambda schema, t, final: _full_disk(final))
    with pytest.raises(WriteError, match="No space left on device"):
        run_screen(cfg)
    m = _manifest(cfg)
    assert m["status"] == "failed" and m["exit_code"] == 2
    assert "No space left on device (ENOSPC)" in m["error"]
    assert str(tmp_path) not in m["error"] and "Doe^Jane" not in m["error"]


def test_the_first_error_is_kept_when_finalising_fails_too(
    tmp_path: Path, ckpt: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = _cfg(tmp_path, ckpt)
    monkeypatch.setattr(run_live, "write_tables_atomic", lambda schema, t, final: _full_disk(final))

    def progress(event) -> None:
        if event.stage == "series":
            raise RuntimeError("the progress viewer crashed")

    with pytest.raises(RuntimeError, match="viewer crashed"):  # not the finalise's WriteError
        run_screen(cfg, progress)
    m = _manifest(cfg)
    assert m["status"] == "failed" and "viewer crashed" in m["error"]


def test_failure_is_recorded_even_when_the_manifest_cannot_be_rewritten(
    tmp_path: Path, ckpt: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = _cfg(tmp_path, ckpt)
    monkeypatch.setattr(run_live, "write_tables_atomic", lambda schema, t, final: _full_disk(final))

    def json_on_a_full_disk(data, final):
        if data.get("status") == "failed":
            return _full_disk(final)
        return write_json_atomic(data, final)

    monkeypatch.setattr(manifest_mod, "write_json_atomic", json_on_a_full_disk)
    with pytest.raises(WriteError):
        run_screen(cfg)
    m = _manifest(cfg)  # overwritten in place
    assert m["status"] == "failed" and "No space left on device" in m["error"]


def test_run_folder_is_private_under_umask_022(tmp_path: Path, ckpt: Path) -> None:
    cfg = _cfg(tmp_path, ckpt)
    old = os.umask(0o022)
    try:
        result = run_screen(cfg)
    finally:
        os.umask(old)
    assert result.exit_code == 0 and result.manifest["inputs_seen"] == 3
    paths = [cfg.out_dir, *cfg.out_dir.rglob("*")]
    names = {p.relative_to(cfg.out_dir).as_posix() for p in paths}
    assert {"manifest.json", "live_files.json", "_state/run.db", "_state/run.lock"} <= names
    live = json.loads((cfg.out_dir / "live_files.json").read_text())["tables"]
    assert live["errors"] and set(live["errors"]) <= names  # no slice here: only errors rows
    for p in paths:
        want = 0o700 if p.is_dir() else 0o600
        assert stat.S_IMODE(p.stat().st_mode) == want, p.relative_to(cfg.out_dir)


def test_the_live_view_prints_what_a_run_will_replace() -> None:
    from rich.console import Console

    from jobs.screen import ProgressEvent
    from pdd_batch.cli.screen import LiveView

    console = Console(record=True, width=200)
    view = LiveView(console)
    with view.progress:
        view(ProgressEvent("warning", 0, None, note="--force: the results now in this folder"))
    assert "warning: --force: the results now in this folder" in console.export_text()
