"""Helpers shared by the screening tests: a synthetic archive, a test-sized checkpoint, and the
direct in-process reference (the same readers + ``model.predict``, no Ray)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch
from dicom_factory import (
    write_corrupt_dicom,
    write_ct_series,
    write_multiframe,
    write_nifti,
    write_non_image,
    write_text,
)
from pydicom.uid import RLELossless

from pdd_batch.ingest.discovery import discover
from pdd_batch.ingest.preprocess import PreprocessSpec
from pdd_batch.ingest.slicing import iter_model_slices
from pdd_batch.ingest.volume import load_series

IMAGE_SIZE = 64


def make_checkpoint(out: Path, threshold: float | None = None) -> Path:
    """Build the ``"test"`` PDD (seeded) and save it with a 64-px preprocessing spec."""
    from model.checkpoint import save_checkpoint
    from model.config import get_config
    from model.pdd import build_model

    torch.manual_seed(0)
    model = build_model(get_config("test"))
    calibration = None
    if threshold is not None:
        calibration = {
            "method": "fpr",
            "fpr": 0.05,
            "threshold": threshold,
            "n_normals": 1,
            "split": "val",
            "data": "synthetic test",
        }
    spec = PreprocessSpec(image_size=IMAGE_SIZE)
    return save_checkpoint(model, out, preprocessing=spec.to_dict(), calibration=calibration)


def make_scoped_checkpoint(out: Path, seed: int, scope: dict, threshold: float) -> Path:
    """A test-size checkpoint with its own weights (own model_id) and a scope."""
    from dataclasses import replace

    import torch

    from model.checkpoint import save_checkpoint
    from model.config import get_config
    from model.pdd import build_model
    from pdd_batch.ingest.preprocess import PreprocessSpec

    torch.manual_seed(seed)
    calibration = {"method": "fpr", "fpr": 0.05, "threshold": threshold, "n_normals": 1}
    return save_checkpoint(
        build_model(replace(get_config("test"), head_seed=seed)),
        out,
        preprocessing=PreprocessSpec(image_size=64).to_dict(),
        calibration=calibration,
        scope=scope,
    )


def make_archive(root: Path, n_ct: int = 2, slices: int = 5) -> Path:
    """DICOM CT series, an enhanced MR, 3D and 4D NIfTI, and bad inputs of every kind."""
    for i in range(n_ct):
        write_ct_series(root / f"ct{i}", n_slices=slices, rows=32, cols=32, seed=100 + i)
    # a duplicate position and a scout: files of a good series that give no slice of their own
    write_ct_series(
        root / "ctdup", n_slices=4, rows=32, cols=32, seed=150, duplicate_at=1, add_scout=True
    )
    write_multiframe(root / "mr" / "enhanced.dcm", n_frames=4, rows=24, cols=24, seed=7)
    write_nifti(root / "nifti" / "vol3d.nii.gz", shape=(20, 16, 4))
    write_nifti(root / "nifti" / "vol4d.nii", shape=(16, 16, 3, 2))
    write_non_image(root / "docs" / "report.dcm", kind="SR", seed=3)
    write_corrupt_dicom(root / "bad" / "corrupt.dcm")
    write_text(root / "bad" / "README.txt")
    # decodes fail after a readable header: a read-stage error, not a discovery one (a file cut
    # short is refused at discovery, so this is an RLE payload the codec cannot decode)
    (broken,) = write_ct_series(
        root / "trunc", n_slices=1, rows=32, cols=32, seed=999, transfer_syntax=RLELossless
    )
    data = bytearray(broken.read_bytes())
    data[len(data) - 1070] = 214  # one byte of the first RLE segment (codec panic, by fuzzing)
    broken.write_bytes(bytes(data))
    return root


def direct_scores(archive: Path, checkpoint: Path) -> dict[str, float]:
    """slice_key -> score computed in this process (no Ray), for every readable series."""
    from model.checkpoint import load_checkpoint

    loaded = load_checkpoint(checkpoint)
    spec = PreprocessSpec.from_dict(loaded.preprocessing)
    disc = discover(archive)
    out: dict[str, float] = {}
    for ref in disc.series:
        try:
            slices = list(iter_model_slices(load_series(disc.root, ref), spec))
        except Exception:  # noqa: BLE001 - unreadable series have no reference scores
            continue
        if not slices:
            continue
        x = torch.from_numpy(np.stack([s.image for s in slices]))[:, None]  # (N, 1, S, S)
        with torch.inference_mode():
            scores = loaded.model.predict(x).scores.numpy()
        for s, score in zip(slices, scores, strict=True):
            out[f"{ref.series_key}:{s.volume_index}:{s.slice_index}"] = float(score)
    return out


def slices_table(out: Path):
    return pq.read_table(out / "slices")
