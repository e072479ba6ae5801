"""DICOM volumes: position sorting, gaps, tilt, MONOCHROME1, multi-frame, 4D, codecs, real data."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
from conftest import shared_path
from dicom_factory import (
    FAKE_PATIENT_NAME,
    slice_values,
    truncate_file,
    write_ct_series,
    write_multiframe,
    write_xray,
)
from pydicom.pixels import apply_modality_lut
from pydicom.uid import ImplicitVRLittleEndian, JPEG2000Lossless, RLELossless

from pdd_batch.ingest.discovery import discover
from pdd_batch.ingest.volume import LoadedSeries, SeriesReadError, load_series


def _load_only(root: Path) -> LoadedSeries:
    result = discover(root)
    assert len(result.series) == 1, [s.to_dict() for s in result.series]
    return load_series(result.root, result.series[0])


def _expected(n: int, rows: int = 16, cols: int = 12, skip: int | None = None, t: int = 0):
    ks = [k for k in range(n + (1 if skip is not None else 0)) if k != skip]
    return np.stack([slice_values(k, rows, cols, t) for k in ks])  # (Z, H, W)


def test_sorted_by_position_not_instance_number(tmp_path: Path) -> None:
    paths = write_ct_series(tmp_path, n_slices=7, shuffle_instances=True, seed=3)
    numbers = [int(pydicom.dcmread(p, stop_before_pixels=True).InstanceNumber) for p in paths]
    assert numbers != sorted(numbers)  # the fixture really shuffles
    loaded = _load_only(tmp_path)
    (vol,) = loaded.volumes
    np.testing.assert_array_equal(vol.data, _expected(7))  # HU after rescale
    assert vol.data.dtype == np.float32
    assert vol.source_files == tuple(p.name for p in paths)
    assert vol.spacing == pytest.approx((2.5, 0.7, 0.7))
    assert loaded.warnings == []


def test_gap_is_reported_and_not_filled(tmp_path: Path) -> None:
    write_ct_series(tmp_path, n_slices=6, gap_at=3)
    loaded = _load_only(tmp_path)
    np.testing.assert_array_equal(loaded.volumes[0].data, _expected(6, skip=3))
    assert any(w.startswith("gap: 1 missing") for w in loaded.warnings)
    assert loaded.ref.n_slices == 6 and loaded.ref.n_gaps == 1


def test_gantry_tilt_spacing_along_normal(tmp_path: Path) -> None:
    write_ct_series(tmp_path, n_slices=5, tilt_deg=12.0, slice_step=2.0)
    loaded = _load_only(tmp_path)
    vol = loaded.volumes[0]
    np.testing.assert_array_equal(vol.data, _expected(5))
    assert vol.spacing[0] == pytest.approx(2.0 * np.cos(np.deg2rad(12.0)), abs=1e-3)
    assert any("gantry tilt 12.0 deg" in w for w in loaded.warnings)
    assert loaded.ref.tilt_deg == pytest.approx(12.0, abs=0.01) and loaded.ref.n_gaps == 0
    assert not any(w.startswith("gap") for w in loaded.warnings)


def test_monochrome1_is_inverted(tmp_path: Path) -> None:
    write_ct_series(tmp_path / "m1", n_slices=3, monochrome1=True)
    write_ct_series(tmp_path / "m2", n_slices=3)
    m1 = _load_only(tmp_path / "m1").volumes[0].data
    m2 = _load_only(tmp_path / "m2").volumes[0].data
    np.testing.assert_array_equal(m1, m2)
    write_xray(tmp_path / "x1" / "dx.dcm", monochrome1=True)
    write_xray(tmp_path / "x2" / "dx.dcm")
    np.testing.assert_array_equal(
        _load_only(tmp_path / "x1").volumes[0].data, _load_only(tmp_path / "x2").volumes[0].data
    )


@pytest.mark.parametrize("syntax", [ImplicitVRLittleEndian, RLELossless, JPEG2000Lossless])
def test_codecs_decode_to_the_same_pixels(tmp_path: Path, syntax: str) -> None:
    write_ct_series(tmp_path, n_slices=3, rows=32, cols=32, transfer_syntax=syntax)
    assert pydicom.dcmread(next(tmp_path.glob("*.dcm"))).file_meta.TransferSyntaxUID == syntax
    vol = _load_only(tmp_path).volumes[0]
    np.testing.assert_array_equal(vol.data, _expected(3, 32, 32))


def test_multiframe_matches_single_frame_series(tmp_path: Path) -> None:
    write_multiframe(tmp_path / "mf" / "enh.dcm", n_frames=6, modality="CT", shuffle_frames=True)
    write_ct_series(tmp_path / "sf", n_slices=6, slice_step=3.0)
    mf = _load_only(tmp_path / "mf").volumes[0]
    sf = _load_only(tmp_path / "sf").volumes[0]
    np.testing.assert_array_equal(mf.data, sf.data)
    assert mf.source_files == ("enh.dcm",) * 6
    assert sorted(mf.frames) == list(range(6)) and list(mf.frames) != list(range(6))


def test_4d_series_split_into_time_points(tmp_path: Path) -> None:
    write_ct_series(tmp_path, n_slices=4, time_points=3, modality="MR", shuffle_instances=True)
    loaded = _load_only(tmp_path)
    assert len(loaded.volumes) == 3 and loaded.n_slices == 12
    for t, vol in enumerate(loaded.volumes):
        np.testing.assert_array_equal(vol.data, _expected(4, t=t))
        assert vol.label == f"t={t}"
    assert "4D: 3 volumes x 4 slices" in loaded.warnings


def test_xray_is_one_slice_volume(tmp_path: Path) -> None:
    write_xray(tmp_path / "cr.dcm", rows=20, cols=30, modality="CR")
    loaded = _load_only(tmp_path)
    assert [v.data.shape for v in loaded.volumes] == [(1, 20, 30)]
    assert loaded.volumes[0].directions is None and loaded.modality == "CR"


def test_corrupt_instance_is_left_out_and_the_series_loads(tmp_path: Path) -> None:
    """A file damaged after discovery loses only its slice: the rest of the series is decoded,
    planned again (the hole is a gap) and the warning names no path, name or UID."""
    paths = write_ct_series(tmp_path, n_slices=5)
    result = discover(tmp_path)
    truncate_file(paths[2], 0.6)  # cut mid-pixel-data after discovery
    loaded = load_series(result.root, result.series[0])
    (vol,) = loaded.volumes
    assert vol.data.shape[0] == 4 and paths[2].name not in {Path(f).name for f in vol.source_files}
    np.testing.assert_array_equal(vol.data, _expected(5)[[0, 1, 3, 4]])
    text = "; ".join(loaded.warnings)
    assert "1 unreadable instance(s) left out" in text and "gap: 1 missing slice" in text
    assert paths[2].name not in text and str(tmp_path) not in text
    assert FAKE_PATIENT_NAME not in text
    uids = pydicom.dcmread(paths[0], stop_before_pixels=True)
    assert uids.StudyInstanceUID not in text and uids.SeriesInstanceUID not in text


def test_series_of_only_bad_instances_fails_without_paths(tmp_path: Path) -> None:
    paths = write_ct_series(tmp_path, n_slices=2)
    result = discover(tmp_path)
    for p in paths:
        truncate_file(p, 0.6)
    with pytest.raises(SeriesReadError, match="no readable instance") as err:
        load_series(result.root, result.series[0])
    assert paths[0].name not in str(err.value) and str(tmp_path) not in str(err.value)


def test_codec_panic_on_corrupt_rle_fails_only_the_series(tmp_path: Path) -> None:
    """pylibjpeg-rle raises pyo3's PanicException (a BaseException) on this corruption."""
    (path,) = write_ct_series(tmp_path, n_slices=1, rows=32, cols=32, transfer_syntax=RLELossless)
    data = bytearray(path.read_bytes())
    data[len(data) - 1070] = 214  # one byte of the first RLE segment (found by fuzzing)
    path.write_bytes(bytes(data))
    result = discover(tmp_path)
    with pytest.raises(SeriesReadError, match="cannot decode pixels"):
        load_series(result.root, result.series[0])


def test_missing_file_is_left_out_cleanly(tmp_path: Path) -> None:
    paths = write_ct_series(tmp_path, n_slices=3)
    result = discover(tmp_path)
    paths[1].unlink()
    loaded = load_series(result.root, result.series[0])
    assert loaded.n_slices == 2
    assert any("left out (file not found)" in w for w in loaded.warnings)


# ---- real data in ../shared (skips cleanly where absent) -------------------------------------


@pytest.mark.realdata
def test_real_head_ct_sorted_with_gap_tilt_and_stray_study() -> None:
    root = shared_path("data", "dicom", "cq500_ct1_head_ct")
    result = discover(root)
    assert sorted(s.n_slices for s in result.series) == [1, 109]
    big = next(s for s in result.series if s.n_slices == 109)
    stray = next(s for s in result.series if s.n_slices == 1)
    assert stray.study_key != big.study_key
    assert stray.files[0].startswith("stray_other_study")
    assert any(w.startswith("gap: 1 missing") for w in big.warnings)
    assert any("gantry tilt 8.5 deg" in w for w in big.warnings)
    assert big.spacing[0] == pytest.approx(0.618, abs=1e-3)
    assert big.n_gaps == 1 and big.tilt_deg == pytest.approx(8.5, abs=0.05)
    loaded = load_series(result.root, big)
    vol = loaded.volumes[0]
    assert vol.data.shape == (109, 512, 512) and float(vol.data.min()) >= -3024.0
    headers = [pydicom.dcmread(root / f, stop_before_pixels=True) for f in vol.source_files]
    normal = np.cross(
        np.array(headers[0].ImageOrientationPatient[:3], float),
        np.array(headers[0].ImageOrientationPatient[3:], float),
    )
    dist = np.array([np.dot(normal, np.array(h.ImagePositionPatient, float)) for h in headers])
    assert np.all(np.diff(dist) > 0)  # strictly increasing along the normal
    numbers = [int(h.InstanceNumber) for h in headers]
    assert sorted(numbers) == list(range(130, 237)) + [238, 239]


@pytest.mark.realdata
def test_real_nine_transfer_syntaxes_decode_identically() -> None:
    root = shared_path("data", "dicom", "transfer_syntaxes_dcm_qa_ts", "In")
    result = discover(root)
    assert len(result.series) == 1 and result.series[0].n_slices == 9
    assert len(result.series[0].transfer_syntaxes) == 7
    loaded = load_series(result.root, result.series[0])
    assert len(loaded.volumes) == 9
    first = loaded.volumes[0].data
    assert first.shape == (1, 384, 384) and float(first.max()) > 0
    for vol in loaded.volumes[1:]:
        np.testing.assert_array_equal(vol.data, first)
    assert any("mosaic" in w for w in loaded.warnings)


@pytest.mark.realdata
def test_real_enhanced_multiframe_equals_classic_series() -> None:
    base = shared_path("data", "dicom")
    classic = discover(base / "siemens_xa30_epi_sag_63sl_classic")
    enhanced = discover(base / "siemens_xa30_epi_sag_enhanced_multiframe")
    assert classic.series[0].n_slices == enhanced.series[0].n_slices == 63
    a = load_series(classic.root, classic.series[0]).volumes[0]
    b = load_series(enhanced.root, enhanced.series[0]).volumes[0]
    assert a.data.shape == b.data.shape == (63, 86, 86)
    assert a.spacing == pytest.approx(b.spacing)
    # Same pixels in the same order (one slice of the classic export carries ~56 burnt-in
    # marker pixels that the enhanced one lacks).
    same = (a.data == b.data).reshape(63, -1).mean(axis=1)  # (63,)
    assert same.min() > 0.99 and int((same < 1.0).sum()) <= 1
    assert np.mean(a.data == b.data[::-1]) < 0.5  # the order matters: reversed does not match


@pytest.mark.realdata
def test_real_ge_fmri_is_split_into_ten_volumes() -> None:
    root = shared_path("data", "dicom", "ge_mr750_epi_fmri_15sl_x10vol")
    result = discover(root)
    ref = result.series[0]
    assert (ref.n_slices, ref.n_volumes, ref.shape) == (150, 10, (15, 64, 64))
    loaded = load_series(result.root, ref)
    assert [v.data.shape for v in loaded.volumes] == [(15, 64, 64)] * 10


def test_monochrome1_ct_keeps_the_modality_lut_hu(tmp_path: Path) -> None:
    # MONOCHROME1 is a display instruction: CT HU are stored * slope + intercept whatever the
    # photometric interpretation (PS3.3 C.11.1), so inverting before rescale flips the HU scale.
    paths = write_ct_series(tmp_path, n_slices=3)
    for p in paths:
        ds = pydicom.dcmread(p)
        ds.PhotometricInterpretation = "MONOCHROME1"
        ds.save_as(p)
    (vol,) = _load_only(tmp_path).volumes
    for z, rel in enumerate(vol.source_files):
        ds = pydicom.dcmread(tmp_path / rel)
        hu = apply_modality_lut(ds.pixel_array, ds)  # independent decode
        np.testing.assert_allclose(vol.data[z], hu, atol=1e-3)


def test_two_stacks_in_one_multiframe_file_each_decoded_once(tmp_path: Path) -> None:
    # A 3-plane survey stored as one enhanced file: discovery makes one series per stack, and each
    # must decode its own frames (not the first stack again).
    path = write_multiframe(tmp_path / "enh.dcm", n_frames=6, modality="MR")
    ds = pydicom.dcmread(path)
    for i in range(3, 6):
        orient = pydicom.Dataset()
        orient.ImageOrientationPatient = [0.0, 1.0, 0.0, 0.0, 0.0, -1.0]  # sagittal
        group = ds.PerFrameFunctionalGroupsSequence[i]
        group.PlaneOrientationSequence = pydicom.Sequence([orient])
        group.PlanePositionSequence[0].ImagePositionPatient = [4.0 * i, -12.0, 20.0]
    ds.save_as(path)
    result = discover(tmp_path)
    assert len(result.series) == 2
    decoded = [load_series(result.root, ref).volumes[0] for ref in result.series]
    assert sorted(f for vol in decoded for f in vol.frames) == list(range(6))
    for ref, vol in zip(result.series, decoded, strict=True):
        assert ref.orientation.split()[0] in ("axial", "sagittal")
        assert vol.directions is not None
        normal = vol.directions[0]
        axis = "sagittal" if abs(normal[0]) > 0.9 else "axial"
        assert ref.orientation.startswith(axis)


def test_shared_survey_file_with_more_files_of_one_stack(tmp_path: Path) -> None:
    # The survey file's sagittal stack continues in single-frame files of the same series, so
    # discovery's part numbers differ from those of a worker that sees only the survey file.
    path = write_multiframe(tmp_path / "enh.dcm", n_frames=6, modality="MR")
    ds = pydicom.dcmread(path)
    sag = [0.0, 1.0, 0.0, 0.0, 0.0, -1.0]
    for i in range(3, 6):
        orient = pydicom.Dataset()
        orient.ImageOrientationPatient = sag
        group = ds.PerFrameFunctionalGroupsSequence[i]
        group.PlaneOrientationSequence = pydicom.Sequence([orient])
        group.PlanePositionSequence[0].ImagePositionPatient = [4.0 * i, -12.0, 20.0]
    ds.save_as(path)
    for i in range(6, 9):
        one = pydicom.dcmread(path)
        one.SOPInstanceUID = pydicom.uid.generate_uid()
        del one.PerFrameFunctionalGroupsSequence, one.SharedFunctionalGroupsSequence
        one.NumberOfFrames = 1
        one.ImageOrientationPatient, one.ImagePositionPatient = sag, [4.0 * i, -12.0, 20.0]
        one.PixelSpacing = [1.5, 1.5]
        one.PixelData = ds.pixel_array[5].tobytes()
        one.save_as(tmp_path / f"sag{i}.dcm")
    result = discover(tmp_path)
    assert sorted(s.orientation for s in result.series) == ["axial", "sagittal"]
    for ref in result.series:
        vol = load_series(result.root, ref).volumes[0]
        assert vol.data.shape[0] == ref.shape[0]
        normal = vol.directions[0]
        assert ref.orientation == ("sagittal" if abs(normal[0]) > 0.9 else "axial")


def test_copied_series_is_not_a_second_time_point(tmp_path: Path) -> None:
    # The same series twice in an archive (a copied folder): every position holds two files with
    # the same InstanceNumber and time; that is a duplicate, not a 4D series of two volumes.
    write_ct_series(tmp_path / "a", n_slices=5)
    shutil.copytree(tmp_path / "a", tmp_path / "a_copy")
    loaded = _load_only(tmp_path)
    assert len(loaded.volumes) == 1 and loaded.n_slices == 5
    np.testing.assert_array_equal(loaded.volumes[0].data, _expected(5))
    assert not any(w.startswith("4D") for w in loaded.warnings)
    assert any("duplicate" in w for w in loaded.warnings)


def test_modality_lut_sequence_is_applied(tmp_path: Path) -> None:
    # A Modality LUT Sequence replaces RescaleSlope/Intercept (PS3.3 C.11.1): a non-linear LUT.
    path = write_xray(tmp_path / "dx.dcm")
    ds = pydicom.dcmread(path)
    item = pydicom.Dataset()
    item.LUTDescriptor = [4096, 0, 16]
    item.ModalityLUTType = "OD"
    item["LUTData"] = pydicom.DataElement(
        0x00283006, "OW", (np.sqrt(np.arange(4096)) * 1000).astype(np.uint16).tobytes()
    )
    ds.ModalityLUTSequence = pydicom.Sequence([item])
    ds.save_as(path)
    (vol,) = _load_only(tmp_path).volumes
    ds = pydicom.dcmread(path)
    np.testing.assert_allclose(vol.data[0], apply_modality_lut(ds.pixel_array, ds), atol=1e-3)
