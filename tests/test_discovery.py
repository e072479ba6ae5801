"""Discovery: every file accounted for, grouping Study -> Series, hashed keys, archives."""

from __future__ import annotations

import json
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pydicom
import pytest
from conftest import shared_path
from dicom_factory import (
    FAKE_PATIENT_ID,
    FAKE_PATIENT_NAME,
    FAKE_STUDY_DATE,
    slice_values,
    truncate_file,
    write_corrupt_dicom,
    write_ct_series,
    write_dicomdir,
    write_multiframe,
    write_nifti,
    write_non_image,
    write_text,
    write_xray,
    write_zero_byte,
)

from pdd_batch.ingest.discovery import (
    Discovery,
    DiscoveryError,
    SeriesRef,
    discover,
    discovery_report,
)
from pdd_batch.ingest.keys import series_key, study_key
from pdd_batch.ingest.volume import load_series


def _uids(paths: list[Path]) -> set[str]:
    out = set()
    for p in paths:
        ds = pydicom.dcmread(p, stop_before_pixels=True)
        out |= {ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID}
    return out


@pytest.fixture
def mixed_archive(tmp_path: Path) -> tuple[Path, dict[str, list[Path]]]:
    """A folder tree with one of everything discovery must account for."""
    root = tmp_path / "archive"
    made: dict[str, list[Path]] = {}
    made["ct"] = write_ct_series(root / "study1" / "ct", n_slices=6, shuffle_instances=True)
    made["mr"] = write_ct_series(
        root / "study1" / "mr", n_slices=4, modality="MR", seed=0, prefix="MR"
    )
    made["other_study"] = write_ct_series(root / "study2", n_slices=3, seed=7)
    made["non_image"] = [
        write_non_image(root / "study1" / f"{k.lower()}.dcm", kind=k)
        for k in ("SR", "KO", "PR", "SEG", "PDF")
    ]
    made["dicomdir"] = [write_dicomdir(root / "DICOMDIR")]
    made["corrupt"] = [write_corrupt_dicom(root / "bad" / "corrupt.dcm")]
    made["empty"] = [write_zero_byte(root / "bad" / "empty.dcm")]
    made["junk"] = [write_text(root / "README"), write_text(root / "notes.txt")]
    made["json"] = [write_text(root / "meta.json", "{}")]
    made["us"] = [write_xray(root / "us" / "us.dcm", modality="US")]
    nii, _ = write_nifti(root / "nifti" / "vol.nii.gz", shape=(8, 7, 5))
    made["nifti"] = [nii]
    bad_nii, _ = write_nifti(root / "nifti" / "cut.nii", shape=(20, 20, 20))
    made["truncated"] = [truncate_file(bad_nii, 0.5)]
    return root, made


def test_every_file_is_accounted_for(mixed_archive: tuple[Path, dict[str, list[Path]]]) -> None:
    root, made = mixed_archive
    result = discover(root)
    on_disk = {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()}
    assert {r.path for r in result.files} == on_disk
    counts = result.counts()
    assert counts["seen"] == len(on_disk) == counts["used"] + counts["skipped"] + counts["failed"]
    by_path = {r.path: r for r in result.files}

    def status(p: Path) -> tuple[str, str]:
        rec = by_path[p.relative_to(root).as_posix()]
        return rec.status, rec.reason

    for p in made["ct"] + made["mr"] + made["other_study"] + made["nifti"]:
        assert status(p)[0] == "used"
    expected_words = {"SR": "SR", "KO": "KOS", "PR": "PR", "SEG": "SEG", "PDF": "PDF"}
    for p, word in zip(made["non_image"], expected_words.values(), strict=True):
        st, reason = status(p)
        assert st == "skipped" and word in reason
    assert status(made["dicomdir"][0]) == ("skipped", "DICOMDIR (media directory, no image)")
    assert status(made["corrupt"][0])[0] == "failed"
    assert status(made["empty"][0]) == ("failed", "empty file (0 bytes)")
    for p in made["junk"] + made["json"]:
        assert status(p)[0] == "skipped"
    assert status(made["us"][0]) == ("skipped", "unsupported modality US")
    st, reason = status(made["truncated"][0])
    assert st == "failed" and "truncated" in reason


def test_series_grouping_and_counts(mixed_archive: tuple[Path, dict[str, list[Path]]]) -> None:
    root, made = mixed_archive
    result = discover(root)
    kinds = sorted((s.kind, s.modality, s.n_slices) for s in result.series)
    assert kinds == [("dicom", "CT", 3), ("dicom", "CT", 6), ("dicom", "MR", 4), ("nifti", "OT", 5)]
    ct = next(s for s in result.series if s.n_slices == 6)
    mr = next(s for s in result.series if s.modality == "MR")
    other = next(s for s in result.series if s.n_slices == 3)
    assert ct.study_key == mr.study_key != other.study_key
    # files listed in slice order (by position, not instance number / file name)
    assert [root / f for f in ct.files] == made["ct"]
    ds = pydicom.dcmread(made["ct"][0], stop_before_pixels=True)
    assert ct.series_key == series_key(ds.StudyInstanceUID, ds.SeriesInstanceUID)
    assert ct.study_key == study_key(ds.StudyInstanceUID)
    assert ct.orientation == "axial" and ct.shape == (6, 16, 12)


def test_no_identifiers_anywhere(mixed_archive: tuple[Path, dict[str, list[Path]]]) -> None:
    root, made = mixed_archive
    result = discover(root)
    text = json.dumps(discovery_report(result)) + json.dumps([s.to_dict() for s in result.series])
    dicoms = [p for k in ("ct", "mr", "other_study", "non_image") for p in made[k]]
    for secret in [FAKE_PATIENT_NAME, FAKE_PATIENT_ID, FAKE_STUDY_DATE, *_uids(dicoms)]:
        assert secret not in text


def test_keys_are_stable_across_runs(mixed_archive: tuple[Path, dict[str, list[Path]]]) -> None:
    root, _ = mixed_archive
    first = sorted((s.study_key, s.series_key) for s in discover(root).series)
    second = sorted((s.study_key, s.series_key) for s in discover(root).series)
    assert first == second and len({k for _, k in first}) == len(first)


def test_series_ref_round_trips_through_json(tmp_path: Path) -> None:
    write_ct_series(tmp_path, n_slices=3, gap_at=1)
    ref = discover(tmp_path).series[0]
    again = SeriesRef.from_dict(json.loads(json.dumps(ref.to_dict())))
    assert again == ref
    with pytest.raises(ValueError, match="bogus"):
        SeriesRef.from_dict({**ref.to_dict(), "bogus": 1})


def test_scout_and_duplicate_are_skipped_with_reason(tmp_path: Path) -> None:
    paths = write_ct_series(tmp_path, n_slices=5, add_scout=True, duplicate_at=2)
    result = discover(tmp_path)
    assert len(result.series) == 1
    ref = result.series[0]
    assert ref.n_slices == 5 and len(ref.files) == 5
    by_path = {r.path: r for r in result.files}
    dup, scout = paths[-2], paths[-1]
    assert "scout" in by_path[scout.name].reason and by_path[scout.name].status == "skipped"
    assert by_path[dup.name].status == "skipped" and "duplicate" in by_path[dup.name].reason
    assert any("scout" in w for w in ref.warnings) and any("duplicate" in w for w in ref.warnings)


def test_two_orientation_stacks_in_one_series_become_two_series(tmp_path: Path) -> None:
    axial = write_ct_series(tmp_path / "a", n_slices=5, seed=3)
    uids = pydicom.dcmread(axial[0], stop_before_pixels=True)
    write_ct_series(
        tmp_path / "c",
        n_slices=4,
        orientation="coronal",
        study_uid=uids.StudyInstanceUID,
        series_uid=uids.SeriesInstanceUID,
        prefix="COR",
    )
    result = discover(tmp_path)
    assert sorted((s.orientation, s.n_slices) for s in result.series) == [
        ("axial", 5),
        ("coronal", 4),
    ]
    assert len({s.series_key for s in result.series}) == 2
    assert result.counts()["used"] == 9


def test_multiframe_and_4d_slice_counts(tmp_path: Path) -> None:
    write_multiframe(tmp_path / "mf" / "enh.dcm", n_frames=7, shuffle_frames=True)
    write_ct_series(tmp_path / "fmri", n_slices=3, time_points=4, modality="MR", seed=5)
    result = discover(tmp_path)
    counts = sorted((s.n_slices, s.n_volumes, s.shape[0]) for s in result.series)
    assert counts == [(7, 1, 7), (12, 4, 3)]


def _zip_dir(src: Path, dest: Path) -> None:
    with zipfile.ZipFile(dest, "w") as zf:
        for p in sorted(src.rglob("*")):
            if p.is_file():
                zf.write(p, p.relative_to(src).as_posix())


@pytest.mark.parametrize("kind", ["zip", "tar.gz"])
def test_archives_are_opened_only_when_asked(tmp_path: Path, kind: str) -> None:
    src = tmp_path / "src"
    write_ct_series(src / "ct", n_slices=4, shuffle_instances=True)
    write_nifti(src / "vol.nii.gz", shape=(6, 5, 4))
    write_text(src / "README")
    root = tmp_path / "root"
    root.mkdir()
    archive = root / f"batch.{kind}"
    if kind == "zip":
        _zip_dir(src, archive)
    else:
        with tarfile.open(archive, "w:gz") as tf:
            tf.add(src, arcname=".")
    closed = discover(root)
    assert closed.series == [] and closed.files[0].status == "skipped"
    assert "--open-archives" in closed.files[0].reason
    opened = discover(root, open_archives=True)
    assert opened.counts() == {"seen": 6, "used": 5, "skipped": 1, "failed": 0}
    dicom = next(s for s in opened.series if s.kind == "dicom")
    assert all(f.startswith(f"batch.{kind}!") for f in dicom.files)
    loaded = load_series(opened.root, dicom)
    means = [float(v.mean()) for v in loaded.volumes[0].data]
    assert means == sorted(means)
    np.testing.assert_array_equal(loaded.volumes[0].data[0], slice_values(0, 16, 12))
    nifti = next(s for s in opened.series if s.kind == "nifti")
    assert load_series(opened.root, nifti).volumes[0].data.shape == (4, 5, 6)


def test_single_file_and_missing_root(tmp_path: Path) -> None:
    path = write_xray(tmp_path / "chest.dcm")
    result = discover(path)
    assert result.root == tmp_path
    assert [(s.modality, s.n_slices, s.orientation) for s in result.series] == [("DX", 1, "2D")]
    with pytest.raises(DiscoveryError):
        discover(tmp_path / "nope")


def test_discovery_report_shape(mixed_archive: tuple[Path, dict[str, list[Path]]]) -> None:
    root, _ = mixed_archive
    report = discovery_report(discover(root))
    files = report["files"]
    assert files["seen"] == files["used"] + files["skipped"] + files["failed"]
    assert len(report["errors"]) == files["skipped"] + files["failed"]
    for row in report["series"]:
        assert {"modality", "n_slices", "warnings", "series_key", "kind", "shape"} <= set(row)
    assert all(not e["file"].startswith("/") for e in report["errors"])


def test_discovery_type(tmp_path: Path) -> None:
    write_ct_series(tmp_path, n_slices=2)
    result = discover(tmp_path)
    assert isinstance(result, Discovery) and result.errors() == []


def test_series_uid_reused_across_studies_stays_apart(tmp_path: Path) -> None:
    shared_series = "1.2.826.0.1.3680043.8.498.1"
    write_ct_series(tmp_path / "s1", n_slices=3, series_uid=shared_series, seed=1)
    write_ct_series(tmp_path / "s2", n_slices=4, series_uid=shared_series, seed=2)
    result = discover(tmp_path)
    assert sorted(s.n_slices for s in result.series) == [3, 4]
    assert len({s.series_key for s in result.series}) == 2


def _fast_and_full(path: Path):
    from pdd_batch.ingest.dicom_headers import (
        SCAN_TAGS,
        header_from_dataset,
        header_from_raw,
        quiet_pydicom,
    )
    from pdd_batch.ingest.dicom_tag_scan import scan_header

    data = path.read_bytes()
    raw = scan_header(data, SCAN_TAGS, complete=True)
    with quiet_pydicom():
        full = header_from_dataset(pydicom.dcmread(path, stop_before_pixels=True), "f")
    return (None if raw is None else header_from_raw(raw, "f")), full


def test_fast_header_scan_matches_pydicom(tmp_path: Path) -> None:
    from pydicom.uid import ImplicitVRLittleEndian, JPEG2000Lossless, RLELossless

    fast_expected = [
        *write_ct_series(tmp_path / "e", n_slices=2, tilt_deg=5.0, monochrome1=True),
        *write_ct_series(tmp_path / "r", n_slices=2, rows=32, cols=32, transfer_syntax=RLELossless),
        *write_ct_series(
            tmp_path / "j", n_slices=1, rows=32, cols=32, transfer_syntax=JPEG2000Lossless
        ),
        write_xray(tmp_path / "x.dcm"),
        write_non_image(tmp_path / "sr.dcm", kind="SR"),
        write_non_image(tmp_path / "pdf.dcm", kind="PDF"),
        write_dicomdir(tmp_path / "DICOMDIR"),
    ]
    for path in fast_expected:
        fast, full = _fast_and_full(path)
        assert fast is not None, path.name
        assert fast == full, path.name
    slow_expected = [
        *write_ct_series(tmp_path / "i", n_slices=1, transfer_syntax=ImplicitVRLittleEndian),
        write_multiframe(tmp_path / "mf.dcm"),  # functional groups: pydicom parses them
    ]
    for path in slow_expected:
        fast, _ = _fast_and_full(path)
        assert fast is None, path.name


@pytest.mark.realdata
def test_fast_header_scan_matches_pydicom_on_real_files() -> None:
    root = shared_path("data", "dicom")
    n_fast = 0
    for path in sorted(root.rglob("*.dcm")):
        fast, full = _fast_and_full(path)
        if fast is not None:
            n_fast += 1
            assert fast == full, path.name
    assert n_fast >= 300  # the CQ500 (JPEG Lossless), GE and XA30 classic files


def test_progress_is_reported(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import pdd_batch.ingest.discovery as discovery

    monkeypatch.setattr(discovery, "PROGRESS_EVERY", 2)
    write_ct_series(tmp_path, n_slices=5)
    seen: list[int] = []
    discovery.discover(tmp_path, progress=seen.append)
    assert seen == [2, 4]


def test_long_headers_are_read_on(tmp_path: Path) -> None:
    from pdd_batch.ingest.archive_io import file_source
    from pdd_batch.ingest.dicom_headers import SCAN_TAGS, read_header
    from pdd_batch.ingest.dicom_tag_scan import HeaderIncomplete, scan_header

    (path,) = write_ct_series(tmp_path, n_slices=1)
    ds = pydicom.dcmread(path)
    block = ds.private_block(0x0029, "TEST LONG HEADER", create=True)
    block.add_new(0x10, "OB", bytes(200_000))  # like a Siemens CSA header
    ds.save_as(path, enforce_file_format=True)
    with pytest.raises(HeaderIncomplete):
        scan_header(path.read_bytes()[:65536], SCAN_TAGS, complete=False)
    fast, full = _fast_and_full(path)
    assert fast is not None and fast == full
    header = read_header(file_source(path), path.name)
    assert header.frames[0].position == full.frames[0].position and header.has_image


def test_links_to_folders_are_followed_once(tmp_path: Path) -> None:
    """Archives assembled from links (``follow_links_outside``): a linked folder is read, a loop
    or a second link to the same folder is recorded as skipped, and nothing is read twice."""
    elsewhere = tmp_path / "elsewhere"
    write_ct_series(elsewhere / "series", n_slices=4, seed=11)
    root = tmp_path / "archive"
    write_ct_series(root / "local", n_slices=3, seed=12)
    (root / "a_link").symlink_to(elsewhere / "series", target_is_directory=True)
    (root / "b_second_link").symlink_to(elsewhere / "series", target_is_directory=True)
    (root / "local" / "loop").symlink_to(root, target_is_directory=True)
    result = discover(root, follow_links_outside=True)
    assert sorted(s.n_slices for s in result.series) == [3, 4]
    by_path = {r.path: r for r in result.files}
    assert {p for p in by_path if p.startswith("a_link/")} and not any(
        p.startswith("b_second_link/") and not p.endswith("/") for p in by_path
    )
    for folder in ("b_second_link/", "local/loop/"):
        assert by_path[folder].status == "skipped" and "already read" in by_path[folder].reason
    assert result.counts()["used"] == 7
