"""Decoded series: volumes in modality units, ready for slicing. One series at a time.

``load_series(root, ref)`` is what a worker calls for one ``SeriesRef`` from discovery; it reads
only that series' files (plain or ``archive!member``), never the whole archive.
"""

from __future__ import annotations

from pathlib import Path

from pdd_batch.ingest.archive_io import IngestLimits
from pdd_batch.ingest.dicom_volume import load_dicom_series
from pdd_batch.ingest.nifti_volume import load_nifti_series
from pdd_batch.ingest.series import LoadedSeries, SeriesReadError, SeriesRef, Volume

__all__ = ["LoadedSeries", "SeriesReadError", "Volume", "load_series"]


def load_series(root: Path, ref: SeriesRef, limits: IngestLimits | None = None) -> LoadedSeries:
    """Decode one series found by ``discover``.

    Args:
        root: the archive root given to ``discover``.
        ref: the series reference (its files are relative to ``root``).
        limits: caps on voxels, frames and archive members (default ``IngestLimits()``).

    Raises:
        SeriesReadError: unreadable pixels, truncated files, inconsistent geometry, over a cap.
            (A DICOM series loses only its unreadable instances, with a warning, while any
            instance remains readable.)
    """
    if ref.kind == "dicom":
        return load_dicom_series(Path(root), ref, limits)
    if ref.kind == "nifti":
        return load_nifti_series(Path(root), ref, limits)
    raise SeriesReadError(f"series {ref.series_key}: unknown kind {ref.kind!r}")
