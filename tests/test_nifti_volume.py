"""NIfTI volumes: canonical reorientation, 4D split, scaling, endianness, truncation, real files."""

from __future__ import annotations

import re
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from conftest import shared_path
from dicom_factory import truncate_file, write_nifti

from pdd_batch.ingest.discovery import discover
from pdd_batch.ingest.volume import SeriesReadError, load_series


def _canonical_zhw(path: Path) -> list[np.ndarray]:
    """Reference: nibabel's own as_closest_canonical, as (Z, H, W) per volume."""
    data = np.asarray(nib.as_closest_canonical(nib.load(path)).get_fdata(), dtype=np.float64)
    if data.ndim == 3:
        data = data[..., None]
    return [data[..., t].transpose(2, 1, 0) for t in range(data.shape[3])]


def _load(path: Path):
    result = discover(path.parent)
    ref = next(s for s in result.series if s.files == (path.name,))
    return ref, load_series(result.root, ref)


LAS = np.array([[-2.0, 0, 0, 30], [0, 2.0, 0, -20], [0, 0, 3.0, 5], [0, 0, 0, 1]])
OBLIQUE_PERMUTED = np.array([[0, 0, 2.5, 0], [-2.0, 0, 0, 0], [0, -1.5, 0, 0], [0, 0, 0, 1]])


@pytest.mark.parametrize("affine", [None, LAS, OBLIQUE_PERMUTED], ids=["ras", "las", "permuted"])
def test_reoriented_like_as_closest_canonical(tmp_path: Path, affine: np.ndarray | None) -> None:
    path, _ = write_nifti(tmp_path / "v.nii.gz", shape=(9, 8, 7), affine=affine)
    ref, loaded = _load(path)
    (expected,) = _canonical_zhw(path)
    (vol,) = loaded.volumes
    np.testing.assert_array_equal(vol.data, expected.astype(np.float32))
    assert ref.n_slices == expected.shape[0] == vol.data.shape[0]
    assert vol.data.dtype == np.float32 and vol.source_files == ("v.nii.gz",) * ref.n_slices
    # canonical axes in LPS: Z -> +S, H -> +A (= -y LPS), W -> +R (= -x LPS)
    np.testing.assert_allclose(np.abs(vol.directions), np.eye(3)[[2, 1, 0]], atol=1e-9)
    assert vol.directions[0, 2] > 0 and vol.directions[1, 1] < 0 and vol.directions[2, 0] < 0


def test_4d_is_split_per_volume(tmp_path: Path) -> None:
    path, values = write_nifti(tmp_path / "f.nii", shape=(6, 5, 4, 3), affine=LAS)
    ref, loaded = _load(path)
    assert (ref.n_slices, ref.n_volumes, ref.shape) == (12, 3, (4, 5, 6))
    assert [v.label for v in loaded.volumes] == ["t=0", "t=1", "t=2"]
    for vol, expected in zip(loaded.volumes, _canonical_zhw(path), strict=True):
        np.testing.assert_array_equal(vol.data, expected.astype(np.float32))
    assert any("4D NIfTI" in w for w in ref.warnings)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"dtype": np.int16, "scale": (0.5, -100.0)},
        {"dtype": np.float64, "big_endian": True},
        {"dtype": np.int16, "big_endian": True, "nifti2": True},
        {"dtype": np.uint8, "scale": (4.0, 0.0)},
    ],
    ids=["scaled", "float64-be", "nifti2-be", "uint8-scaled"],
)
def test_scaled_and_big_endian_data(tmp_path: Path, kwargs: dict) -> None:
    shape = (5, 4, 3) if kwargs["dtype"] is np.uint8 else (7, 6, 5)
    path, values = write_nifti(tmp_path / "d.nii.gz", shape=shape, **kwargs)
    _, loaded = _load(path)
    expected = values.transpose(2, 1, 0)  # RAS (X, Y, Z) -> (S, A, R) = (Z, H, W)
    np.testing.assert_allclose(loaded.volumes[0].data, expected, rtol=1e-6)


def test_2d_nifti_is_one_slice(tmp_path: Path) -> None:
    path, _ = write_nifti(tmp_path / "flat.nii", shape=(10, 8), zooms=(1.0, 1.0, 1.0))
    ref, loaded = _load(path)
    assert ref.n_slices == 1 and loaded.volumes[0].data.shape == (1, 8, 10)


@pytest.mark.parametrize("name", ["t.nii", "t.nii.gz"])
def test_truncated_file_fails_at_discovery_and_load(tmp_path: Path, name: str) -> None:
    path, _ = write_nifti(tmp_path / name, shape=(30, 30, 30))
    ref = discover(tmp_path).series[0]
    truncate_file(path, 0.5)
    result = discover(tmp_path)
    assert result.series == []
    (rec,) = result.files
    assert rec.status == "failed" and "NIfTI" in rec.reason
    with pytest.raises(SeriesReadError, match=name.replace(".", r"\.")):
        load_series(tmp_path, ref)


def test_not_a_nifti_fails_cleanly(tmp_path: Path) -> None:
    (tmp_path / "fake.nii").write_bytes(b"this is not an image" * 40)
    (rec,) = discover(tmp_path).files
    assert rec.status == "failed" and rec.reason.startswith("NIfTI")


# ---- real data in ../shared (skips cleanly where absent) -------------------------------------


def _verify_shapes(verify: Path) -> dict[str, tuple[int, ...]]:
    shapes = {}
    for line in verify.read_text().splitlines():
        m = re.match(r"(\S+)\s+Nifti\dImage shape=\(([\d, ]+)\)", line)
        if m:
            shapes[m.group(1)] = tuple(int(v) for v in m.group(2).split(","))
    return shapes


@pytest.mark.realdata
def test_real_nifti_files_open_with_the_right_slice_count() -> None:
    root = shared_path("data", "nifti")
    shapes = _verify_shapes(root / "VERIFY.txt")
    assert len(shapes) == 13
    result = discover(root)
    by_name = {Path(s.files[0]).name: s for s in result.series}
    assert set(by_name) == set(shapes)
    assert result.counts()["failed"] == 0
    for name, shape in shapes.items():
        ref = by_name[name]
        n_vol = shape[3] if len(shape) == 4 else 1
        # every VERIFY orientation is xAS (LAS/RAS): the axial axis is the 3rd
        assert (ref.n_slices, ref.n_volumes) == (shape[2] * n_vol, n_vol), name
        loaded = load_series(result.root, ref)  # every file really decodes
        assert [v.data.shape for v in loaded.volumes] == [(shape[2], shape[1], shape[0])] * n_vol
        assert all(np.isfinite(v.data).all() for v in loaded.volumes), name
    small = by_name["functional.nii"]
    loaded = load_series(result.root, small)
    assert [v.data.shape for v in loaded.volumes] == [(3, 21, 17)] * 20
    expected = _canonical_zhw(result.root / small.files[0])
    np.testing.assert_allclose(loaded.volumes[7].data, expected[7], rtol=1e-6)


@pytest.mark.realdata
def test_real_dcm2niix_reference_niftis_are_series_too() -> None:
    root = shared_path("data", "dicom", "transfer_syntaxes_dcm_qa_ts", "Ref")
    result = discover(root)
    assert len(result.series) == 9
    assert all(s.kind == "nifti" and s.n_slices == 35 and s.modality == "MR" for s in result.series)
    assert result.counts() == {"seen": 18, "used": 9, "skipped": 9, "failed": 0}


def test_rgb_nifti_is_reported_not_crashing(tmp_path: Path) -> None:
    rgb = np.zeros((4, 5, 6), dtype=[("R", "u1"), ("G", "u1"), ("B", "u1")])
    nib.save(nib.Nifti1Image(rgb, np.eye(4)), tmp_path / "rgb.nii")
    result = discover(tmp_path)
    assert result.series == []
    (record,) = [r for r in result.files if r.status == "failed"]
    assert "data type" in record.reason


def test_complex_nifti_gives_magnitude(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    values = (rng.normal(size=(4, 5, 6)) + 1j * rng.normal(size=(4, 5, 6))).astype(np.complex64)
    nib.save(nib.Nifti1Image(values, np.eye(4)), tmp_path / "c.nii")
    _, loaded = _load(tmp_path / "c.nii")
    expected = np.abs(values).transpose(2, 1, 0)  # RAS affine: (Z, H, W) = (S, A, R)
    np.testing.assert_allclose(loaded.volumes[0].data, expected, rtol=1e-6)


# ---- caps before allocation (issue 16 item 5) ------------------------------------------------


def test_gzip_bomb_is_refused_before_inflating(tmp_path: Path) -> None:
    """A .nii.gz promising 128 MiB of zeros in ~130 kB (size field consistent): a failed record
    at discovery and, when it replaces a file after discovery, a read error in the worker, with
    a small peak allocation both times (it would be 512 MiB of float32)."""
    import tracemalloc

    from hostile_factory import _gzip_bomb

    path, _ = write_nifti(tmp_path / "vol.nii.gz", shape=(8, 8, 4))
    ref, _ = _load(path)
    _gzip_bomb(path)
    tracemalloc.start()
    try:
        rec = next(r for r in discover(tmp_path).files if r.path == "vol.nii.gz")
        with pytest.raises(SeriesReadError, match="compression-ratio cap") as err:
            load_series(tmp_path, ref)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert rec.status == "failed" and "--max-compression-ratio" in rec.reason
    assert "vol.nii.gz" not in str(err.value).split(":", 1)[1]  # only the file prefix names it
    assert peak < 200 * 2**20


def test_gzip_bomb_inside_a_zip_is_never_inflated_whole(tmp_path: Path) -> None:
    import zipfile

    from hostile_factory import _gzip_bomb

    bomb = _gzip_bomb(tmp_path / "src" / "bomb.nii.gz")
    root = tmp_path / "root"
    root.mkdir()
    with zipfile.ZipFile(root / "batch.zip", "w") as zf:
        zf.write(bomb, "bomb.nii.gz")
    (rec,) = discover(root, open_archives=True).files
    assert rec.path == "batch.zip!bomb.nii.gz" and rec.status == "failed"
    assert "cap" in rec.reason


def test_voxel_cap_refuses_a_large_nifti(tmp_path: Path) -> None:
    from pdd_batch.ingest.archive_io import IngestLimits

    path, _ = write_nifti(tmp_path / "vol.nii", shape=(8, 8, 4, 3))
    small = IngestLimits(max_series_voxels=8 * 8 * 4 * 3 - 1)
    (rec,) = discover(tmp_path, limits=small).files
    assert rec.status == "failed" and "--max-series-voxels" in rec.reason
    ref, _ = _load(path)
    with pytest.raises(SeriesReadError, match="over the cap"):
        load_series(tmp_path, ref, small)
