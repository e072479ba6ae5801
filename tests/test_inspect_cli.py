"""`pdd-batch inspect`: one JSON object with accounted files, series and errors; no identifiers."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import pydicom
import pytest
from conftest import shared_path
from dicom_factory import (
    FAKE_PATIENT_ID,
    FAKE_PATIENT_NAME,
    FAKE_STUDY_DATE,
    write_corrupt_dicom,
    write_ct_series,
    write_multiframe,
    write_nifti,
    write_non_image,
    write_text,
    write_zero_byte,
)
from typer.testing import CliRunner

from pdd_batch.cli.app import app
from pdd_batch.ingest.keys import file_key, short_key


@pytest.fixture
def archive(tmp_path: Path) -> tuple[Path, list[str]]:
    root = tmp_path / "Doe^Jane archive"
    ct = write_ct_series(root / "a", n_slices=5, gap_at=2, shuffle_instances=True)
    mf = write_multiframe(root / "b" / "enh.dcm", n_frames=4)
    write_non_image(root / "a" / "report.dcm", kind="SR")
    write_corrupt_dicom(root / "bad.dcm")
    write_zero_byte(root / "zero.dcm")
    write_text(root / "README.txt")
    write_nifti(root / "n" / "vol4d.nii.gz", shape=(6, 5, 4, 2))
    secrets = [FAKE_PATIENT_NAME, FAKE_PATIENT_ID, FAKE_STUDY_DATE, str(tmp_path)]
    for p in (ct[0], mf):
        ds = pydicom.dcmread(p, stop_before_pixels=True)
        secrets += [ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID]
    return root, secrets


def _run(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(app, ["inspect", *args])
    return result.exit_code, result.output


def test_json_is_one_object_with_accounted_files(archive: tuple[Path, list[str]]) -> None:
    root, secrets = archive
    code, out = _run(str(root), "--json", "--show-paths")
    assert code == 0
    report = json.loads(out)  # exactly one JSON document
    files = report["files"]
    assert all(isinstance(files[k], int) for k in ("seen", "used", "skipped", "failed"))
    n_on_disk = sum(1 for p in root.rglob("*") if p.is_file())
    assert files["seen"] == n_on_disk == files["used"] + files["skipped"] + files["failed"]
    assert (files["used"], files["skipped"], files["failed"]) == (7, 2, 2)
    errors = {e["file"]: e["reason"] for e in report["errors"]}
    assert set(errors) == {"a/report.dcm", "bad.dcm", "zero.dcm", "README.txt"}
    series = sorted(report["series"], key=lambda s: s["n_slices"])
    assert [(s["kind"], s["modality"], s["n_slices"]) for s in series] == [
        ("dicom", "MR", 4),
        ("dicom", "CT", 5),
        ("nifti", "OT", 8),
    ]
    ct = series[1]
    assert any(w.startswith("gap") for w in ct["warnings"])
    assert ct["shape"] == [5, 16, 12] and len(ct["spacing"]) == 3 and ct["transfer_syntaxes"]
    assert series[2]["n_volumes"] == 2 and series[2]["shape"] == [4, 5, 6]
    for secret in secrets:
        assert secret not in out


def test_table_shows_short_keys_and_no_identifiers(archive: tuple[Path, list[str]]) -> None:
    root, secrets = archive
    code, out = _run(str(root))
    assert code == 0
    assert "files: 11 seen = 7 used + 2 skipped + 2 failed" in out
    assert "gap" in out and short_key(file_key("bad.dcm")) in out
    for secret in secrets:
        assert secret not in out


def test_open_archives_flag(tmp_path: Path) -> None:
    src = tmp_path / "src"
    write_ct_series(src, n_slices=3)
    with zipfile.ZipFile(tmp_path / "batch.zip", "w") as zf:
        for p in sorted(src.iterdir()):
            zf.write(p, f"inner/{p.name}")
    zip_only = tmp_path / "root"
    zip_only.mkdir()
    (tmp_path / "batch.zip").rename(zip_only / "batch.zip")
    closed = json.loads(_run(str(zip_only), "--json")[1])
    assert closed["files"] == {"seen": 1, "used": 0, "skipped": 1, "failed": 0}
    opened = json.loads(_run(str(zip_only), "--json", "--open-archives")[1])
    assert opened["files"] == {"seen": 3, "used": 3, "skipped": 0, "failed": 0}
    assert opened["series"][0]["n_slices"] == 3


def test_missing_archive_exits_2(tmp_path: Path) -> None:
    code, out = _run(str(tmp_path / "nowhere"), "--json")
    assert code == 2


@pytest.mark.realdata
def test_real_dicom_folder_counts() -> None:
    root = shared_path("data", "dicom")
    code, out = _run(str(root), "--json")
    assert code == 0
    report = json.loads(out)
    files = report["files"]
    assert files["seen"] == sum(1 for p in root.rglob("*") if p.is_file())
    assert files["failed"] == 0
    by_first = {s["n_slices"] for s in report["series"]}
    assert {109, 63, 150, 9, 35} <= by_first
    enhanced = [s for s in report["series"] if s["n_slices"] == 63]
    assert len(enhanced) == 2 and {s["n_files"] for s in enhanced} == {1, 63}
    assert "CQ500" not in out


def test_links_outside_and_caps_are_options(tmp_path: Path) -> None:
    """`--follow-links-outside` reads a link out of the archive; `--max-series-voxels` refuses a
    series over it (a failed row naming the option)."""
    write_ct_series(tmp_path / "outside", n_slices=3, seed=2)
    root = tmp_path / "root"
    root.mkdir()
    (root / "link").symlink_to(tmp_path / "outside", target_is_directory=True)
    runner = CliRunner()

    def report(*extra: str) -> dict:
        result = runner.invoke(app, ["inspect", str(root), "--json", *extra])
        assert result.exit_code == 0, result.output
        return json.loads(result.output)

    refused = report()
    assert refused["files"]["skipped"] == 1 and not refused["series"]
    assert "outside the archive" in refused["errors"][0]["reason"]
    assert report("--follow-links-outside")["files"]["used"] == 3
    capped = report("--follow-links-outside", "--max-series-voxels", "100")
    assert capped["files"]["failed"] == 3
    assert all("--max-series-voxels" in e["reason"] for e in capped["errors"])


def test_paths_of_skipped_and_failed_files_only_with_show_paths(tmp_path: Path) -> None:
    """Folder names are patient names: without ``--show-paths`` files are named by key, in the
    table and in the JSON, and no reason carries a path; with it, the relative paths appear."""
    root = tmp_path / "archive"
    patient = root / "SMITH^ANNA_1957"
    write_ct_series(patient / "CT_head", n_slices=3, seed=4)
    write_corrupt_dicom(patient / "SMITH_ANNA_scan.dcm")  # failed
    write_text(patient / "notes_SMITH.txt")  # skipped
    write_zero_byte(patient / "CT_head" / "SMITH_empty.dcm")  # failed
    names = ["SMITH^ANNA_1957", "SMITH_ANNA_scan", "notes_SMITH", "SMITH_empty", "CT_head"]
    rels = ["SMITH^ANNA_1957/SMITH_ANNA_scan.dcm", "SMITH^ANNA_1957/notes_SMITH.txt",
            "SMITH^ANNA_1957/CT_head/SMITH_empty.dcm"]  # fmt: skip
    hidden_table, hidden_json = _run(str(root))[1], _run(str(root), "--json")[1]
    for out in (hidden_table, hidden_json):
        assert not [n for n in names if n in out]
    report = json.loads(hidden_json)
    assert {e["file_key"] for e in report["errors"]} == {file_key(r) for r in rels}
    assert all("file" not in e for e in report["errors"])
    assert all(short_key(file_key(r)) in hidden_table for r in rels)
    shown = json.loads(_run(str(root), "--json", "--show-paths")[1])
    assert {e["file"] for e in shown["errors"]} == set(rels)  # the positive control
    assert "SMITH_ANNA_scan.dcm" in _run(str(root), "--show-paths")[1]


def test_summary_line_says_study_for_one_study(tmp_path: Path) -> None:
    write_ct_series(tmp_path / "one", n_slices=2, seed=1)
    assert "1 series in 1 study\n" in _run(str(tmp_path))[1]
    write_ct_series(tmp_path / "two", n_slices=2, seed=2)
    assert "2 series in 2 studies" in _run(str(tmp_path))[1]
