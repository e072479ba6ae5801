"""Slicing to model input: windowing, percentiles, display orientation, reformatting, streaming."""

from __future__ import annotations

import inspect
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from conftest import shared_path
from dicom_factory import slice_values, write_ct_series, write_xray
from PIL import Image

from pdd_batch.ingest.discovery import discover
from pdd_batch.ingest.preprocess import (
    WINDOW_PRESETS,
    PreprocessSpec,
    fit_to_square,
    load_image_file,
    window_ct,
)
from pdd_batch.ingest.slicing import ModelSlice, iter_model_slices
from pdd_batch.ingest.volume import LoadedSeries, load_series


def _load(root: Path) -> LoadedSeries:
    result = discover(root)
    assert len(result.series) == 1
    return load_series(result.root, result.series[0])


def test_ct_window_then_fit_to_square(tmp_path: Path) -> None:
    paths = write_ct_series(tmp_path, n_slices=4, rows=10, cols=14, shuffle_instances=True)
    spec = PreprocessSpec(image_size=32, ct_window="bone")
    slices = list(iter_model_slices(_load(tmp_path), spec))
    assert [s.slice_index for s in slices] == [0, 1, 2, 3]
    assert [s.source_file for s in slices] == [p.name for p in paths]
    for s in slices:
        expected = fit_to_square(window_ct(slice_values(s.slice_index, 10, 14), 600, 2800), 32)
        np.testing.assert_allclose(s.image, expected, atol=1e-6)
        assert s.image.dtype == np.float32 and s.image.shape == (32, 32) and s.window == "bone"


def test_window_presets_change_the_image(tmp_path: Path) -> None:
    write_ct_series(tmp_path, n_slices=2, rows=8, cols=8)
    series = _load(tmp_path)
    images = {
        name: next(iter_model_slices(series, PreprocessSpec(image_size=16, ct_window=name))).image
        for name in WINDOW_PRESETS
    }
    assert not np.allclose(images["brain"], images["subdural"])
    assert not np.allclose(images["subdural"], images["bone"])


def test_mr_percentile_over_the_volume(tmp_path: Path) -> None:
    write_ct_series(tmp_path, n_slices=5, modality="MR")
    slices = list(iter_model_slices(_load(tmp_path), PreprocessSpec(image_size=16)))
    assert {s.window for s in slices} == {"percentile"}
    means = [float(s.image.mean()) for s in slices]
    assert means == sorted(means) and means[0] < 0.1 and means[-1] > 0.6  # one range per volume
    assert all(0.0 <= s.image.min() and s.image.max() <= 1.0 for s in slices)


def test_iter_model_slices_streams(tmp_path: Path) -> None:
    write_ct_series(tmp_path, n_slices=3, time_points=2, modality="MR")
    stream = iter_model_slices(_load(tmp_path), PreprocessSpec(image_size=16))
    assert inspect.isgenerator(stream)
    first = next(stream)
    assert isinstance(first, ModelSlice) and (first.volume_index, first.slice_index) == (0, 0)
    rest = list(stream)
    assert [(s.volume_index, s.slice_index) for s in rest][-1] == (1, 2) and len(rest) == 5


def test_dicom_and_nifti_of_the_same_anatomy_give_the_same_slices(tmp_path: Path) -> None:
    """LPS DICOM and RAS NIfTI are shown the same way (anterior up, patient right on the left)."""
    rows, cols, n = 6, 9, 4
    write_ct_series(tmp_path / "dcm", n_slices=n, rows=rows, cols=cols, modality="MR",
                    pixel_spacing=(0.7, 0.7), slice_step=2.5)  # fmt: skip
    vol = np.stack([slice_values(k, rows, cols) for k in range(n)])  # (Z, rows=+y, cols=+x) LPS
    # NIfTI voxel (i, j, k) = x index, y index, z index; LPS +x = RAS -x, LPS +y = RAS -y
    data = vol.transpose(2, 1, 0).astype(np.int16)  # (cols, rows, Z)
    nii = tmp_path / "nii" / "same.nii.gz"
    nii.parent.mkdir()
    nib.save(nib.Nifti1Image(data, np.diag([-0.7, -0.7, 2.5, 1.0])), nii)
    spec = PreprocessSpec(image_size=16)
    from_dicom = [s.image for s in iter_model_slices(_load(tmp_path / "dcm"), spec)]
    from_nifti = [s.image for s in iter_model_slices(_load(tmp_path / "nii"), spec)]
    assert len(from_dicom) == len(from_nifti) == n
    for a, b in zip(from_dicom, from_nifti, strict=True):
        np.testing.assert_allclose(a, b, atol=1e-6)


def test_coronal_reformat(tmp_path: Path) -> None:
    n, rows, cols = 16, 10, 12
    write_ct_series(tmp_path, n_slices=n, rows=rows, cols=cols, pixel_spacing=(0.7, 0.7),
                    slice_step=0.7)  # fmt: skip
    series = _load(tmp_path)
    spec = PreprocessSpec(image_size=16, ct_window="bone", axis="coronal")
    slices = list(iter_model_slices(series, spec))
    assert len(slices) == rows  # one coronal slice per image row (anterior -> posterior)
    vol = np.stack([slice_values(k, rows, cols) for k in range(n)])  # (Z, H, W)
    for s in slices:
        coronal = vol[::-1, s.slice_index, :]  # superior at the top
        expected = fit_to_square(window_ct(coronal, 600, 2800), 16)
        np.testing.assert_allclose(s.image, expected, atol=1e-6)


def test_too_few_slices_keep_the_acquired_plane(tmp_path: Path) -> None:
    write_ct_series(tmp_path, n_slices=3, rows=8, cols=10)
    series = _load(tmp_path)
    spec = PreprocessSpec(image_size=16, ct_window="bone", axis="sagittal")
    slices = list(iter_model_slices(series, spec))
    assert len(slices) == 3
    assert any("too few slices" in w for w in series.warnings)
    for s in slices:  # shown as the axial slices they are
        expected = fit_to_square(window_ct(slice_values(s.slice_index, 8, 10), 600, 2800), 16)
        np.testing.assert_allclose(s.image, expected, atol=1e-6)


def test_non_square_pixels_are_resampled(tmp_path: Path) -> None:
    write_ct_series(tmp_path, n_slices=1, rows=8, cols=16, pixel_spacing=(1.4, 0.7))
    (s,) = iter_model_slices(_load(tmp_path), PreprocessSpec(image_size=16, ct_window="bone"))
    # 8 rows of 1.4 mm = 16 rows of 0.7 mm: a full square, so no zero-padded rows
    assert float(s.image[0].min()) > 0.2 and float(s.image[-1].min()) > 0.2


def test_xray_is_one_percentile_slice(tmp_path: Path) -> None:
    write_xray(tmp_path / "dx.dcm", rows=40, cols=30, monochrome1=True)
    (s,) = iter_model_slices(_load(tmp_path), PreprocessSpec(image_size=32))
    assert s.window == "percentile" and s.source_file == "dx.dcm"
    assert s.image[:, 0].max() == 0.0 and s.image.max() > 0.95  # side padding


@pytest.mark.realdata
def test_real_head_ct_streams_109_windowed_slices() -> None:
    root = shared_path("data", "dicom", "cq500_ct1_head_ct", "series_4cc_D3D_0.625mm")
    series = _load(root)
    spec = PreprocessSpec(image_size=64)
    n = 0
    for s in iter_model_slices(series, spec):
        assert s.image.shape == (64, 64) and s.image.dtype == np.float32
        assert 0.0 <= float(s.image.min()) and float(s.image.max()) <= 1.0
        n += 1
    assert n == 109


def test_sixteen_bit_png_keeps_its_grey_levels(tmp_path: Path) -> None:
    # PIL's convert("L") clips 16-bit values at 255: a 16-bit PNG came out almost all white.
    values = (np.arange(64 * 64, dtype=np.uint32).reshape(64, 64) * 16).astype(np.uint16)
    Image.fromarray(values).save(tmp_path / "g16.png")
    Image.fromarray((values >> 8).astype(np.uint8)).save(tmp_path / "g8.png")
    spec = PreprocessSpec(image_size=64)
    wide = load_image_file(tmp_path / "g16.png", spec)
    np.testing.assert_allclose(wide, values / 65535.0, atol=1e-6)
    np.testing.assert_allclose(wide, load_image_file(tmp_path / "g8.png", spec), atol=1 / 255)
