"""Synthetic "normal studies" of a site for the calibration tests: several CT studies, one axial
series each, whose slices are a head-like disc with seeded noise (so every slice scores
differently), written with pydicom into tmp_path."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
from dicom_factory import CT_INTERCEPT, write_ct_series


def _head_slice(rng: np.random.Generator, rows: int, cols: int) -> np.ndarray:
    """HU of a disc (~35 HU, brain-window grey) on air, with noise and a random offset."""
    yy, xx = np.mgrid[:rows, :cols]
    cy, cx = rows / 2 + rng.normal(0, 1.5), cols / 2 + rng.normal(0, 1.5)
    disc = (yy - cy) ** 2 + (xx - cx) ** 2 < (0.38 * min(rows, cols)) ** 2
    hu = np.where(disc, 35.0 + rng.normal(0, 8.0, (rows, cols)), -1000.0)
    return hu.astype(np.float32)


def write_normal_study(
    folder: Path, study_uid: str, *, seed: int, n_slices: int = 4, size: int = 32
) -> list[Path]:
    """One study (one CT series) whose pixels are replaced by seeded head-like slices."""
    paths = write_ct_series(
        folder, n_slices=n_slices, rows=size, cols=size, seed=seed, study_uid=study_uid,
        series_uid=f"{study_uid}.1",
    )  # fmt: skip
    rng = np.random.default_rng(seed)
    for path in paths:
        ds = pydicom.dcmread(path)
        stored = np.clip(np.rint(_head_slice(rng, size, size) - CT_INTERCEPT), 0, 4095)
        ds.PixelData = stored.astype(np.uint16).tobytes()
        ds.save_as(path, enforce_file_format=True)
    return paths


def study_uid(i: int) -> str:
    return f"1.2.826.0.1.3680043.8.498.77.{i + 1}"


def write_site_archive(root: Path, n_studies: int, *, first: int = 0) -> list[str]:
    """``n_studies`` normal studies under ``root/study_<i>``; returns their StudyInstanceUIDs."""
    uids = []
    for i in range(first, first + n_studies):
        uid = study_uid(i)
        write_normal_study(root / f"study_{i:02d}", uid, seed=500 + i, n_slices=3 + i % 3)
        uids.append(uid)
    return uids
