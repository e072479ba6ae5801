"""Field-of-view normalisation (issue 22 item 1): a small head with a table in a 512 field of
view, a bordered radiograph, PNG and DICOM input of the same image, and old checkpoints."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from dicom_factory import CT_INTERCEPT, FAKE_PATIENT_ID, FAKE_PATIENT_NAME, _base_dataset, _uid
from PIL import Image
from pydicom.uid import (
    CTImageStorage,
    DigitalXRayImageStorageForPresentation,
    ExplicitVRLittleEndian,
)

from pdd_batch.ingest.discovery import discover
from pdd_batch.ingest.framing import MARGIN, Framer, FramingError, frame_image, resolve_framing
from pdd_batch.ingest.preprocess import (
    PreprocessError,
    PreprocessSpec,
    fit_to_square,
    load_image_file,
    window_ct,
)
from pdd_batch.ingest.slicing import iter_model_slices
from pdd_batch.ingest.volume import LoadedSeries, load_series

FOV = 512
PIXEL_MM = 0.5


def _write_dicom(path: Path, values: np.ndarray, modality: str, z: float = 0.0) -> Path:
    """One single-frame DICOM file holding ``values`` (HU for CT), 16-bit unsigned stored."""
    sop = CTImageStorage if modality == "CT" else DigitalXRayImageStorageForPresentation
    ds = _base_dataset(sop, modality, _uid("study-f"), _uid(f"series-f-{modality}"),
                       FAKE_PATIENT_NAME, FAKE_PATIENT_ID)  # fmt: skip
    ds.InstanceNumber = int(z) + 1
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.PhotometricInterpretation = "MONOCHROME2"
    if modality == "CT":
        ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
        ds.ImagePositionPatient = [0.0, 0.0, float(z) * 2.5]
        ds.PixelSpacing = [PIXEL_MM, PIXEL_MM]
        ds.SliceThickness = 2.5
        ds.RescaleSlope, ds.RescaleIntercept, ds.RescaleType = 1.0, CT_INTERCEPT, "HU"
        stored = np.rint(values - CT_INTERCEPT)
    else:
        ds.ImagerPixelSpacing = [0.2, 0.2]
        stored = np.rint(values)
    stored = np.ascontiguousarray(stored.astype(np.uint16))
    ds.Rows, ds.Columns = stored.shape
    ds.SamplesPerPixel, ds.BitsAllocated, ds.BitsStored, ds.HighBit = 1, 16, 16, 15
    ds.PixelRepresentation = 0
    ds.PixelData = stored.tobytes()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def _head_and_table(n: int) -> tuple[np.ndarray, np.ndarray]:
    """HU (N, 512, 512): a small head (a sphere: skin, skull, brain; its widest slice in the
    middle) off centre, and a table slab below it plus a head-holder bar beside it (separate,
    both well above any foreground threshold). Also returns the head mask (N, 512, 512)."""
    z, r, c = np.mgrid[0:n, 0:FOV, 0:FOV].astype(np.float32)
    dist = np.sqrt(
        ((z - (n - 1) / 2) * 2.5) ** 2
        + ((r - 220) * PIXEL_MM) ** 2
        + ((c - 280) * PIXEL_MM * 1.2) ** 2
    )  # mm from the head's centre (an ellipsoid)
    hu = np.full((n, FOV, FOV), -1000.0, dtype=np.float32)
    head = dist <= 45.0
    hu[head] = 60.0  # skin
    hu[dist <= 42.0] = 1200.0  # skull
    hu[dist <= 37.0] = 35.0 + (r[dist <= 37.0] % 7)  # brain, textured
    hu[:, 380:400, 40:470] = 300.0  # the table, 20 px below the head's lowest row (340)
    hu[:, 150:300, 440:450] = 500.0  # a head-holder bar to the side
    return hu, head


def _series(root: Path) -> LoadedSeries:
    found = discover(root)
    assert len(found.series) == 1
    return load_series(found.root, found.series[0])


def test_ct_volume_small_head_with_table_cut_to_the_head(tmp_path: Path) -> None:
    n = 9
    hu, head = _head_and_table(n)
    for k in range(n):
        _write_dicom(tmp_path / "ct" / f"IM{k:03d}.dcm", hu[k], "CT", z=k)
    size = 128
    slices = list(
        iter_model_slices(_series(tmp_path / "ct"), PreprocessSpec(size, framing="ct-head-v1"))
    )
    assert len(slices) == n
    # Expected: the head alone (table and holder set to air), cut to its bounding box over all
    # slices widened by MARGIN of its longer side, padded square and resized.
    rows, cols = np.flatnonzero(head.any(axis=(0, 2))), np.flatnonzero(head.any(axis=(0, 1)))
    r0, r1, c0, c1 = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
    m = int(round(MARGIN * max(r1 - r0, c1 - c0)))
    assert max(r1 - r0, c1 - c0) < FOV / 2  # a small head in the field of view
    head_only = np.where(head, hu, -1000.0)
    for s in slices:
        assert s.image.shape == (size, size) and s.image.dtype == np.float32
        unit = window_ct(head_only[s.slice_index], 40.0, 80.0)
        expected = fit_to_square(unit[r0 - m : r1 + m, c0 - m : c1 + m], size)
        np.testing.assert_allclose(s.image, expected, atol=1e-5)
    mid = slices[n // 2].image
    assert mid[size // 2, :].max() == pytest.approx(1.0)  # the skull reaches across the frame
    unframed = next(iter(iter_model_slices(_series(tmp_path / "ct"), PreprocessSpec(size))))
    assert unframed.image[int(390 / FOV * size)].max() > 0.9  # the table is there without framing


def test_framer_keeps_the_largest_component_and_its_bounding_box() -> None:
    hu, head = _head_and_table(7)
    unit = window_ct(hu, 40.0, 80.0)  # (N, H, W)
    framer = Framer("ct-head-v1", lambda i: unit[i], len(unit), (PIXEL_MM, PIXEL_MM))
    assert framer.frame is not None and framer.frame.keep is not None
    assert not framer.frame.keep[:, 380:400, :].any() and not framer.frame.keep[:, :, 440:450].any()
    assert framer.frame.keep[head & (unit > 0.2)].all()
    cut = framer.apply(3, unit[3])
    assert cut.shape[0] < FOV / 2 and cut.shape[1] < FOV / 2


def _bordered_radiograph(rng: np.random.Generator) -> tuple[np.ndarray, tuple[int, int, int, int]]:
    """A (100, 80) radiograph in [0, 1]: textured anatomy inside a black border (top 9 rows,
    right 6 columns), a bright collimation band (bottom 14 rows, with slight noise) and a grey
    one (left 5 columns). Returns the image and the anatomy's (r0, r1, c0, c1)."""
    img = np.zeros((100, 80), dtype=np.float32)
    box = (9, 86, 5, 74)
    r0, r1, c0, c1 = box
    img[r0:r1, c0:c1] = rng.uniform(0.1, 0.9, (r1 - r0, c1 - c0))
    img[r1:, :] = 0.97 + rng.uniform(-0.01, 0.01, (100 - r1, 80))
    img[:, :c0] = 0.5
    return img, box


def test_radiograph_borders_and_collimation_cropped(tmp_path: Path) -> None:
    img, (r0, r1, c0, c1) = _bordered_radiograph(np.random.default_rng(0))
    np.testing.assert_array_equal(frame_image(img, "radiograph-v1"), img[r0:r1, c0:c1])
    png = tmp_path / "xr.png"
    Image.fromarray(np.rint(img * 255).astype(np.uint8)).save(png)
    out = load_image_file(png, PreprocessSpec(64, framing="radiograph-v1"))
    quantised = np.rint(img * 255).astype(np.float32) / 255
    np.testing.assert_allclose(out, fit_to_square(quantised[r0:r1, c0:c1], 64), atol=1e-6)
    assert not np.allclose(out, load_image_file(png, PreprocessSpec(64)))


def _export_png(image: np.ndarray, path: Path) -> Path:
    """What a viewer exports: the model-domain slice as an 8-bit greyscale PNG."""
    Image.fromarray(np.rint(image * 255).astype(np.uint8)).save(path)
    return path


@pytest.mark.parametrize("modality", ["CT", "DX"])
def test_identical_for_png_and_dicom_input_of_the_same_image(tmp_path: Path, modality) -> None:
    """A slice exported through the model's intensity mapping (window / percentiles) and that
    DICOM slice give the same model input, framing included (8-bit rounding aside)."""
    if modality == "CT":
        values = _head_and_table(1)[0][0][::4, ::4]  # (128, 128) HU: head, table, holder
        framing = "ct-head-v1"
    else:
        img, _ = _bordered_radiograph(np.random.default_rng(1))
        values = np.zeros((128, 128), np.float32)
        values[14:114, 24:104] = img * 3000.0 + 200.0
        framing = "radiograph-v1"
    _write_dicom(tmp_path / "d" / "one.dcm", values, modality)
    side = values.shape[0]  # unframed at its own size: the model-domain slice, not resized
    domain = next(iter_model_slices(_series(tmp_path / "d"), PreprocessSpec(side))).image
    png = _export_png(domain, tmp_path / "one.png")
    spec = PreprocessSpec(64, framing=framing)
    from_dicom = next(iter_model_slices(_series(tmp_path / "d"), spec)).image
    from_png = load_image_file(png, spec)
    np.testing.assert_allclose(from_png, from_dicom, atol=0.5 / 255 + 1e-6)
    assert not np.allclose(from_dicom, load_image_file(png, PreprocessSpec(64)), atol=0.02)


OLD_PREPROCESSING = {  # what every checkpoint before framing stored (the old defaults' dict)
    "axis": "axial",
    "ct_window": "brain",
    "extra": {},
    "image_size": 128,
    "percentiles": [0.5, 99.5],
}


def test_old_checkpoint_without_framing_behaves_as_before(tmp_path: Path) -> None:
    spec = PreprocessSpec.from_dict(json.loads(json.dumps(OLD_PREPROCESSING)))
    assert spec.framing is None and spec.to_dict() == OLD_PREPROCESSING
    hu, _ = _head_and_table(3)
    for k in range(3):
        _write_dicom(tmp_path / "ct" / f"IM{k:03d}.dcm", hu[k], "CT", z=k)
    for s in iter_model_slices(_series(tmp_path / "ct"), spec):
        expected = fit_to_square(window_ct(hu[s.slice_index], 40.0, 80.0), 128)
        np.testing.assert_allclose(s.image, expected, atol=1e-6)  # table and all, unframed
    framed = PreprocessSpec.from_dict({**OLD_PREPROCESSING, "framing": "ct-head-v1"})
    assert framed.to_dict()["framing"] == "ct-head-v1"


def test_unknown_framing_is_refused_and_auto_follows_the_modality() -> None:
    with pytest.raises(PreprocessError, match="framing"):
        PreprocessSpec(framing="ct-v9")
    assert resolve_framing("auto", ["CT"]) == "ct-head-v1"
    assert resolve_framing("auto", ["CR", "DX"]) == "radiograph-v1"
    assert resolve_framing("auto", ["MR"]) == "mr-v1"
    assert resolve_framing("auto", ["CT", "MR"]) is None and resolve_framing("auto", []) is None
    assert resolve_framing("none", ["CT"]) is None
    with pytest.raises(FramingError):
        resolve_framing("head", ["CT"])


def test_mr_volume_bounding_box_without_zeroing() -> None:
    vol = np.full((5, 60, 60), 0.02, dtype=np.float32)  # noise floor
    vol[:, 20:40, 10:30] = 0.6
    framer = Framer("mr-v1", lambda i: vol[i], 5)
    assert framer.frame is not None and framer.frame.keep is None
    assert framer.frame.rows == (19, 41) and framer.frame.cols == (9, 31)  # 5 % of 20 px: 1 px
    assert framer.apply(0, vol[0]).min() == pytest.approx(0.02)


def test_train_records_its_framing_and_calibrate_uses_it(tmp_path: Path) -> None:
    """``train`` stores the framing its scope asks for (auto) and ``calibrate``/``evaluate``
    read images through the checkpoint's spec: a table-like bar beside a head-like disc in a
    PNG changes no score once framing has removed it."""
    import torch

    from jobs.evaluate import calibrate_checkpoint
    from jobs.train import TrainConfig, train_model
    from model.checkpoint import load_checkpoint
    from model.config import get_config
    from pdd_batch.evaluation.datasets import list_images

    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:96, :96]
    for i in range(6):
        img = np.zeros((96, 96), np.float32)
        disc = (yy - 40) ** 2 + (xx - 44) ** 2 < 22**2
        img[disc] = 0.5 + rng.normal(0, 0.03, int(disc.sum()))
        bar = img.copy()
        bar[80:86, 5:90] = 1.0  # a separate component: the table
        for name, pixels in (("plain", img), ("bar", bar)):
            (tmp_path / name / "normal").mkdir(parents=True, exist_ok=True)
            _export_png(np.clip(pixels, 0, 1), tmp_path / name / "normal" / f"{i}.png")
    items = list_images(tmp_path / "plain")
    scope = {"modalities": ["CT"], "body_parts": ["HEAD"], "orientations": ["axial"]}
    cfg, run = get_config("test"), TrainConfig(epochs=1, batch_size=3)
    train_model(items, tmp_path / "ck", cfg, run, scope=scope)
    train_model(items, tmp_path / "plain", cfg, run, scope=scope, framing="none")
    assert load_checkpoint(tmp_path / "ck").preprocessing["framing"] == "ct-head-v1"
    assert "framing" not in load_checkpoint(tmp_path / "plain").preprocessing
    bar_items = list_images(tmp_path / "bar")
    normal = calibrate_checkpoint(items, tmp_path / "ck", 0.5)["threshold"]
    with_bar = calibrate_checkpoint(bar_items, tmp_path / "ck", 0.5)["threshold"]
    assert with_bar == pytest.approx(normal, abs=1e-5)
    plain = calibrate_checkpoint(items, tmp_path / "plain", 0.5)["threshold"]
    assert calibrate_checkpoint(bar_items, tmp_path / "plain", 0.5)["threshold"] != plain


def test_large_volume_found_on_a_strided_grid(monkeypatch: pytest.MonkeyPatch) -> None:
    """Over ``MAX_LABEL_VOXELS`` the component is labelled on a strided grid: the same head,
    table removed, every head voxel above the threshold kept, nothing of the table."""
    from pdd_batch.ingest import framing

    hu, head = _head_and_table(7)
    unit = window_ct(hu, 40.0, 80.0)  # (N, H, W)
    full = Framer("ct-head-v1", lambda i: unit[i], len(unit), (PIXEL_MM, PIXEL_MM)).frame
    monkeypatch.setattr(framing, "MAX_LABEL_VOXELS", unit.size // 20)  # stride 3
    grid = Framer("ct-head-v1", lambda i: unit[i], len(unit), (PIXEL_MM, PIXEL_MM)).frame
    assert full is not None and grid is not None and grid.keep is not None
    assert (grid.rows, grid.cols) == (full.rows, full.cols)
    np.testing.assert_array_equal(grid.keep, full.keep)


def test_overlay_fallback_refuses_a_per_volume_framing_it_cannot_reproduce(tmp_path: Path) -> None:
    """Overlays rebuild the model input: a CT file read alone cannot be framed per volume, so
    the file fallback refuses (the heatmap is then drawn alone) rather than misplace it; a
    radiograph is framed per image, exactly as screened."""
    from pdd_batch.review.overlay import OverlayError, _dicom_slice

    hu, _ = _head_and_table(1)
    ct = _write_dicom(tmp_path / "ct" / "one.dcm", hu[0][::4, ::4], "CT")
    with pytest.raises(OverlayError, match="per volume"):
        _dicom_slice(ct, PreprocessSpec(64, framing="ct-head-v1"))
    img, _ = _bordered_radiograph(np.random.default_rng(2))
    xr = _write_dicom(tmp_path / "xr" / "one.dcm", img * 3000.0 + 200.0, "DX")
    spec = PreprocessSpec(64, framing="radiograph-v1")
    screened = next(iter_model_slices(_series(tmp_path / "xr"), spec)).image
    np.testing.assert_allclose(_dicom_slice(xr, spec), screened, atol=1e-6)


def test_selection_scores_candidates_on_validation_images_framed_like_the_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``train``'s model selection trains each candidate with the framing its scope asks for
    and computes the candidate's figure on validation images read through that same framing."""
    import torch

    from jobs import selection
    from jobs.train import TrainConfig
    from model.config import get_config
    from pdd_batch.evaluation.datasets import list_images

    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:64, :64]
    (tmp_path / "d" / "normal").mkdir(parents=True)
    for i in range(6):
        img = np.where((yy - 30) ** 2 + (xx - 34) ** 2 < 15**2, 0.5, 0.0)
        _export_png(np.clip(img + rng.normal(0, 0.02, img.shape), 0, 1),
                    tmp_path / "d" / "normal" / f"{i}.png")  # fmt: skip
    items = list_images(tmp_path / "d")
    seen: list[str | None] = []
    real = selection.validation_images

    def spy(val, image_size, framing=None):
        seen.append(framing)
        return real(val, image_size, framing)

    monkeypatch.setattr(selection, "validation_images", spy)
    scope = {"modalities": ["CT"], "body_parts": ["HEAD"], "orientations": ["axial"]}
    selection.train_candidate(items[:4], items[4:], tmp_path / "ck", get_config("test"),
                              TrainConfig(epochs=1, batch_size=2), scope=scope)  # fmt: skip
    assert seen == ["ct-head-v1"]
