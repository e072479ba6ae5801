"""Decoded series: volumes in modality units, ready for slicing. One series at a time.

``load_series(root, ref)`` is what a worker calls for one ``SeriesRef`` from discovery; it reads
only that series' files (plain or ``archive!member``), never the whole archive.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from pdd_batch.discovery import SeriesRef


class SeriesReadError(RuntimeError):
    """A series that cannot be decoded. The message names the relative file and reason only."""


@dataclass(frozen=True)
class Volume:
    """One 3D volume (a 2D image is a 1-slice volume).

    Attributes:
        data: float32 (Z, H, W) in modality units (HU for CT; MONOCHROME1 inverted, except CT).
        source_files: per slice, the archive-relative file it came from.
        frames: per slice, the frame index inside that file (0 for single-frame files).
        spacing: (slice, row, column) spacing in mm; slice spacing 0.0 when unknown.
        directions: LPS unit vectors of the array axes (Z, H, W), shape (3, 3), or None for 2D
            images without geometry. NIfTI volumes are given in the same LPS convention.
        label: e.g. "t=3" for the 4th time point of a 4D series; "" otherwise.
    """

    data: np.ndarray  # (Z, H, W) float32
    source_files: tuple[str, ...]
    frames: tuple[int, ...]
    spacing: tuple[float, float, float]
    directions: np.ndarray | None  # (3, 3) or None
    label: str = ""

    def __post_init__(self) -> None:
        if self.data.ndim != 3:
            raise ValueError(f"Volume.data must be (Z, H, W), got shape {self.data.shape}")
        if len(self.source_files) != self.data.shape[0] or len(self.frames) != self.data.shape[0]:
            raise ValueError("Volume.source_files and frames need one entry per slice")


@dataclass
class LoadedSeries:
    """A decoded series: its reference, modality, volumes and warnings (no identifiers)."""

    ref: SeriesRef
    modality: str
    volumes: list[Volume]
    warnings: list[str] = field(default_factory=list)

    @property
    def n_slices(self) -> int:
        """Slices over all volumes."""
        return sum(v.data.shape[0] for v in self.volumes)


def load_series(root: Path, ref: SeriesRef) -> LoadedSeries:
    """Decode one series found by ``discover``.

    Args:
        root: the archive root given to ``discover``.
        ref: the series reference (its files are relative to ``root``).

    Raises:
        SeriesReadError: unreadable pixels, truncated files, inconsistent geometry.
    """
    # Imported here: both readers build Volume objects from this module.
    if ref.kind == "dicom":
        from pdd_batch.dicom_volume import load_dicom_series

        return load_dicom_series(Path(root), ref)
    if ref.kind == "nifti":
        from pdd_batch.nifti_volume import load_nifti_series

        return load_nifti_series(Path(root), ref)
    raise SeriesReadError(f"series {ref.series_key}: unknown kind {ref.kind!r}")
