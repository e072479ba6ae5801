"""The bundled sample archive: built from installed packages, deterministic, every kind of input."""

from __future__ import annotations

import hashlib
from pathlib import Path

import nibabel as nib
import pydicom

from pdd_batch.ingest.sample import build_sample_archive


def _digest(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def test_sample_archive_is_deterministic_and_holds_every_kind(tmp_path: Path) -> None:
    a = build_sample_archive(tmp_path / "a")
    b = build_sample_archive(tmp_path / "b")
    assert _digest(a) == _digest(b)  # same bytes every build: nightly reruns are incremental
    files = _digest(a)
    dicoms = [f for f in files if f.endswith(".dcm") and not f.startswith("broken/")]
    modalities = {pydicom.dcmread(a / f, stop_before_pixels=True).Modality for f in dicoms}
    assert {"CT", "MR", "SR", "CR"} <= modalities
    lesion = pydicom.dcmread(a / "generated/ct_lesion/slice_006.dcm")
    normal = pydicom.dcmread(a / "generated/ct_normal/slice_006.dcm")
    assert lesion.SeriesInstanceUID != normal.SeriesInstanceUID
    assert lesion.pixel_array.shape == (64, 64)
    assert nib.load(a / "nibabel/anatomical.nii").ndim == 3
    assert nib.load(a / "nibabel/example_nifti2.nii.gz").ndim == 4
    assert "broken/corrupt.dcm" in files and "broken/notes.txt" in files


def test_rebuild_replaces_the_folder(tmp_path: Path) -> None:
    a = build_sample_archive(tmp_path / "s")
    (a / "stray.txt").write_text("x")
    build_sample_archive(a)
    assert not (a / "stray.txt").exists()


def test_rebuilt_sample_keeps_every_series_fingerprint(tmp_path: Path) -> None:
    """`screen --sample` rebuilds the archive each time; its reruns must stay incremental."""
    from jobs.screen import series_fingerprint
    from pdd_batch.ingest.discovery import discover

    def prints() -> dict[str, str]:
        found = discover(build_sample_archive(tmp_path / "s"))
        return {ref.series_key: series_fingerprint(found.root, ref) for ref in found.series}

    first = prints()
    assert first and prints() == first


def test_sample_holds_a_chest_radiograph_the_default_set_routes_to_its_chest_model(
    tmp_path: Path,
) -> None:
    """The chest X-ray member of the default set has a series of its own in the sample."""
    from jobs.screen import resolve_model
    from model.default import default_model_paths
    from pdd_batch.ingest.discovery import discover
    from pdd_batch.ingest.scope import route

    found = discover(build_sample_archive(tmp_path / "s"))
    head, chest = (resolve_model(p).scope for p in default_model_paths())
    routes = route(found.series, [head, chest])
    radiographs = [
        (ref, to) for ref, to in zip(found.series, routes, strict=True) if ref.modality == "CR"
    ]
    assert [(r.body_part, r.view, to) for r, to in radiographs] == [("CHEST", "PA", 1)]
    cts = [
        to
        for ref, to in zip(found.series, routes, strict=True)
        if (ref.modality, ref.body_part) == ("CT", "HEAD")
    ]
    assert cts and set(cts) == {0}
