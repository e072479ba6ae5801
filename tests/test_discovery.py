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
    result = discover(root)
    report = discovery_report(result)
    files = report["files"]
    assert files["seen"] == files["used"] + files["skipped"] + files["failed"]
    assert len(report["errors"]) == files["skipped"] + files["failed"]
    for row in report["series"]:
        assert {"modality", "n_slices", "warnings", "series_key", "kind", "shape"} <= set(row)
    assert all("file" not in e and len(e["file_key"]) >= 16 for e in report["errors"])
    shown = discovery_report(result, show_paths=True)["errors"]
    assert all(not e["file"].startswith("/") for e in shown)


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


# ---- hostile input (issue 16 items 4, 5, 12) -------------------------------------------------


def test_hostile_archive_discovers_with_every_file_accounted_for(tmp_path: Path) -> None:
    """inf IS values, 500 nested sequences, damaged zip/tar members, forged sizes, a gzip bomb,
    links outside the root and junk: discovery finishes and records each exactly as expected,
    with reasons that name no path and no identifier."""
    from hostile_factory import build_hostile_archive

    built = build_hostile_archive(tmp_path / "root")
    result = discover(tmp_path / "root", open_archives=True)
    got = {r.path: r.status for r in result.files}
    assert got == built["expected"]
    assert sorted(s.n_slices for s in result.series) == [1, 1, 31]  # 30 + the undecodable one
    for rec in result.errors():
        assert rec.reason and str(tmp_path) not in rec.reason
        assert not any(p.split("!")[-1].rstrip("/") in rec.reason for p in built["paths"])
        assert not any(secret in rec.reason for secret in built["identifiers"])


def test_inf_in_integer_strings_is_a_failed_record_or_ignored(tmp_path: Path) -> None:
    """IS "inf": NumberOfFrames unusable (failed record); InstanceNumber only orders ties."""
    from hostile_factory import _raw_is, _variant

    (good,) = write_ct_series(tmp_path / "a", n_slices=1, seed=1)
    _variant(good, tmp_path / "b" / "frames.dcm", lambda ds: _raw_is(ds, 0x00280008, b"inf "))
    _variant(good, good, lambda ds: _raw_is(ds, 0x00200013, b"inf "))
    result = discover(tmp_path)
    by_path = {r.path: r for r in result.files}
    assert by_path["a/IM0001.dcm"].status == "used"
    assert by_path["b/frames.dcm"].status == "failed"
    assert "NumberOfFrames" in by_path["b/frames.dcm"].reason
    assert load_series(result.root, result.series[0]).n_slices == 1


def test_deeply_nested_sequences_fail_one_file(tmp_path: Path) -> None:
    from hostile_factory import _deep_sequences

    (good,) = write_ct_series(tmp_path / "a", n_slices=1, seed=1)
    (other,) = write_ct_series(tmp_path / "src", n_slices=1, seed=2)
    _deep_sequences(good, tmp_path / "b" / "deep.dcm", levels=500)
    _deep_sequences(other, tmp_path / "c" / "shallow.dcm", levels=3)  # real headers nest a little
    other.unlink()
    by_path = {r.path: r for r in discover(tmp_path).files}
    assert by_path["b/deep.dcm"].status == "failed" and "nested" in by_path["b/deep.dcm"].reason
    assert by_path["c/shallow.dcm"].status == "used"


def test_damaged_archive_members_are_failed_records(tmp_path: Path) -> None:
    from hostile_factory import _cut_tar_gz, _patch_zip, _stored_zip

    (good,) = write_ct_series(tmp_path / "src", n_slices=1, seed=1)
    root = tmp_path / "root"
    data = good.read_bytes()
    _patch_zip(_stored_zip(root / "crc.zip", "x.dcm", data), flip_data_byte=True)
    _patch_zip(_stored_zip(root / "enc.zip", "x.dcm", data), encrypted=True)
    _stored_zip(root / "ok.zip", "x.dcm", data)
    noise = np.random.default_rng(0).integers(0, 4096, 16384, dtype=np.uint16).tobytes()
    _cut_tar_gz(root / "cut.tar.gz", [("a.txt", b"notes"), ("b.dcm", data + noise)])
    by_path = {r.path: r for r in discover(root, open_archives=True).files}
    assert by_path["ok.zip!x.dcm"].status == "used"
    for rel in ("crc.zip!x.dcm", "enc.zip!x.dcm", "cut.tar.gz!b.dcm", "cut.tar.gz"):
        assert by_path[rel].status == "failed", rel
        assert "archive" in by_path[rel].reason and "x.dcm" not in by_path[rel].reason
    assert by_path["cut.tar.gz!a.txt"].status == "skipped"


def test_links_outside_the_root_are_refused_unless_asked(tmp_path: Path) -> None:
    outside = write_ct_series(tmp_path / "outside", n_slices=3, seed=2)
    root = tmp_path / "root"
    write_ct_series(root / "local", n_slices=2, seed=3)
    (root / "file_link.dcm").symlink_to(outside[0])
    (root / "dir_link").symlink_to(tmp_path / "outside", target_is_directory=True)
    (root / "inside_link").symlink_to(root / "local", target_is_directory=True)
    refused = discover(root)
    by_path = {r.path: r for r in refused.files}
    for rel in ("file_link.dcm", "dir_link/"):
        assert by_path[rel].status == "skipped" and "outside the archive" in by_path[rel].reason
    assert not any(p.startswith("dir_link/") and p != "dir_link/" for p in by_path)
    assert [s.n_slices for s in refused.series] == [2]  # the inside link is the same folder
    followed = discover(root, follow_links_outside=True)
    assert sorted(s.n_slices for s in followed.series) == [2, 3]


# ---- caps before allocation (issue 16 item 5) ------------------------------------------------


def _peak_bytes(fn) -> tuple[object, int]:
    """``fn()`` and the peak of Python/numpy allocations while it ran (tracemalloc)."""
    import tracemalloc

    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        out = fn()
        return out, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_forged_sizes_are_refused_before_allocation(tmp_path: Path) -> None:
    """NumberOfFrames 2**31, Rows = Columns = 65535 over many slices, a zip member declaring
    4 GiB: failed records with the cap named, and the driver's peak allocation stays small."""
    import resource

    from hostile_factory import _patch_zip, _raw_is, _stored_zip, _variant

    (good,) = write_ct_series(tmp_path / "src", n_slices=1, seed=1)
    root = tmp_path / "root"
    _variant(good, root / "frames.dcm", lambda ds: _raw_is(ds, 0x00280008, b"2147483648"))
    rows = write_ct_series(root / "rows", n_slices=25, rows=8, cols=8, seed=4)
    for p in rows:
        _variant(p, p, lambda ds: ds.update({"Rows": 65535, "Columns": 65535}))
    _patch_zip(_stored_zip(root / "big.zip", "x.dcm", good.read_bytes()), declared_size=2**32 - 16)
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB
    result, peak = _peak_bytes(lambda: discover(root, open_archives=True))
    by_path = {r.path: r for r in result.files}
    assert "--max-frames-per-file" in by_path["frames.dcm"].reason
    assert all("--max-series-voxels" in by_path[f"rows/{p.name}"].reason for p in rows)
    assert "--max-member-bytes" in by_path["big.zip!x.dcm"].reason
    assert result.counts() == {"seen": 27, "used": 0, "skipped": 0, "failed": 27}
    assert peak < 200 * 2**20
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before < 200 * 1024


def test_limits_are_configurable_and_checked_again_at_load(tmp_path: Path) -> None:
    """A series over ``max_series_voxels`` is failed at discovery and refused by the worker
    before its volume is allocated; instances forged after discovery (8192 x 8192 slices over
    a few hundred bytes of pixels) are left out without allocating their size."""
    from hostile_factory import _variant

    from pdd_batch.ingest.archive_io import IngestLimits
    from pdd_batch.ingest.volume import SeriesReadError

    paths = write_ct_series(tmp_path, n_slices=5, rows=16, cols=12, seed=5)
    small = IngestLimits(max_series_voxels=500)  # one file (192 voxels) fits, the series not
    refused = discover(tmp_path, limits=small)
    assert not refused.series and refused.counts()["failed"] == 5
    assert all("series of 960 voxels" in r.reason for r in refused.files)
    result = discover(tmp_path)
    with pytest.raises(SeriesReadError, match="series of 960 voxels"):
        load_series(result.root, result.series[0], small)
    for p in paths:
        _variant(p, p, lambda ds: ds.update({"Rows": 8192, "Columns": 8192}))
    raised, peak = _peak_bytes(
        lambda: pytest.raises(SeriesReadError, load_series, result.root, result.series[0])
    )
    assert "no readable instance (pixel data shorter than the image" in str(raised.value)
    assert peak < 200 * 2**20


@pytest.mark.realdata
def test_default_limits_pass_every_real_file() -> None:
    """Every series in ../shared/data/dicom and nifti is discovered and decoded with the default
    caps (nothing refused: no failed record, every series loads)."""
    for name in ("dicom", "nifti"):
        result = discover(shared_path("data", name), open_archives=True)
        assert result.counts()["failed"] == 0, [r.reason for r in result.errors()]
        for ref in result.series:
            assert load_series(result.root, ref).n_slices > 0


@pytest.mark.parametrize("syntax", ["1.2.840.10008.1.2.1", "1.2.840.10008.1.2"])
def test_bad_copies_of_instances_fail_alone_and_the_series_stays_whole(
    tmp_path: Path, syntax: str
) -> None:
    """Copies of a good series' instances (same UIDs, folders that sort first) cut mid-pixel
    data, with empty pixel data, or with pixel data shorter than the image: each is a failed
    record with its reason (explicit and implicit VR), and every good instance is used."""
    from hostile_factory import _bad_copies

    good = write_ct_series(tmp_path / "ct", n_slices=24, rows=32, cols=32, transfer_syntax=syntax)
    bad = _bad_copies(tmp_path, good)
    result = discover(tmp_path)
    (ref,) = result.series
    assert ref.n_slices == 24 and set(ref.files) == {f"ct/{p.name}" for p in good}
    reasons = {r.path: r.reason for r in result.files if r.path in bad}
    assert [r.status for r in result.files if r.path in bad] == ["failed"] * 3
    assert "pixel data cut short" in reasons[next(p for p in bad if "partial" in p)]
    assert "empty pixel data" in reasons[next(p for p in bad if "zero" in p)]
    assert "shorter than the image" in reasons[next(p for p in bad if "wrong" in p)]
