"""Incremental discovery: a second discovery against the run store's file index reads no header
of an unchanged archive, reads only what changed otherwise, and always finds what a full
``discover`` finds (series, their files in order, every file's record)."""

from __future__ import annotations

import os
from pathlib import Path

from dicom_factory import write_ct_series, write_nifti, write_text

from pdd_batch.ingest.discovery import discover
from pdd_batch.ingest.keys import redact_paths
from pdd_batch.runs.discovery_index import discover_indexed
from pdd_batch.runs.state import RunState

STUDY, SERIES = "1.2.826.0.1.3680043.8.498.71", "1.2.826.0.1.3680043.8.498.72"


def _view(disc) -> tuple[list, list]:
    series = sorted((r.series_key, repr(r.to_dict())) for r in disc.series)
    files = sorted(
        (f.path, f.status, redact_paths(f.reason, [f.path]), f.series_key) for f in disc.files
    )
    return series, files


def _archive(root: Path) -> None:
    write_ct_series(root / "DOE^JANE" / "a", n_slices=4, study_uid=STUDY, series_uid=SERIES)
    write_ct_series(root / "b", n_slices=3, add_scout=True, seed=2)
    write_nifti(root / "c" / "vol.nii.gz", shape=(8, 8, 3))
    (root / "c" / "vol.json").write_text('{"Modality": "MR"}')
    write_text(root / "README.txt")


def _again(state: RunState, archive: Path) -> dict:
    disc, stats = discover_indexed(state, archive)
    assert _view(disc) == _view(discover(archive))  # the same as a full discovery
    return stats


def test_unchanged_archive_reads_no_header_and_changes_read_only_their_groups(
    tmp_path: Path,
) -> None:
    archive, out = tmp_path / "archive", tmp_path / "out"
    _archive(archive)
    n_files = sum(1 for p in archive.rglob("*") if p.is_file())
    state = RunState.load(out)
    first = _again(state, archive)
    assert first == {"header_reads": n_files, "files_unchanged": 0, "shards": 0}
    second = _again(RunState.load(out), archive)
    assert second == {"header_reads": 0, "files_unchanged": n_files, "shards": 0}

    write_ct_series(archive / "d", n_slices=2, seed=9)  # a new series: its files only
    assert _again(RunState.load(out), archive)["header_reads"] == 2

    extra = write_ct_series(  # one more file of series a: the group of a is read again
        archive / "late", n_slices=1, study_uid=STUDY, series_uid=SERIES, slice_step=1.25,
        prefix="LATE",
    )  # fmt: skip
    assert _again(RunState.load(out), archive)["header_reads"] == 1 + 4

    st = extra[0].stat()
    os.utime(extra[0], ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # changed: read again
    (archive / "c" / "vol.json").write_text('{"Modality": "CT"}')  # its NIfTI is read again
    assert _again(RunState.load(out), archive)["header_reads"] == (1 + 4) + (1 + 1)

    extra[0].unlink()  # gone: series a grouped again without it
    stats = _again(RunState.load(out), archive)
    assert stats["header_reads"] == 4
    assert _again(RunState.load(out), archive)["header_reads"] == 0


def test_the_index_holds_no_path(tmp_path: Path) -> None:
    import sqlite3

    archive, out = tmp_path / "archive", tmp_path / "out"
    _archive(archive)
    (archive / "DOE^JANE" / "broken.dcm").write_bytes(b"DICM but not really")
    state = RunState.load(out)
    discover_indexed(state, archive)
    state.close()
    with sqlite3.connect(out / "_state" / "run.db") as db:
        dump = "\n".join(db.iterdump())
    assert "DOE" not in dump and "JANE" not in dump and ".dcm" not in dump
    assert STUDY not in dump and SERIES not in dump
