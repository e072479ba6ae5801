"""The types the ingest stages share: series references, file records, decoded volumes.

A leaf module (imports nothing of the project), so discovery and the DICOM/NIfTI readers can all
use these without importing each other.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np

STATUSES = ("used", "skipped", "failed")
IN_MEMORY_ONLY = frozenset({"age_years"})  # SeriesRef facts never serialised


@dataclass(frozen=True)
class SeriesRef:
    """One series to decode: what a worker needs, and header facts for reports. No identifiers.

    Attributes:
        series_key, study_key: truncated SHA-256 of the UIDs (NIfTI: of the relative path/folder).
        kind: "dicom" or "nifti".
        modality: DICOM Modality (NIfTI: from a BIDS/dcm2niix sidecar .json, else "OT").
        files: relative posix paths (``archive!member`` inside archives), in slice order.
        spares: files left out as copies of instances in ``files`` (same SOP Instance UID, or the
            same slice position): the read stage uses them only when an instance of ``files``
            cannot be decoded, so a slice is not lost to a damaged copy that discovery kept.
        n_slices: slices over all volumes (4D: slices per volume x volumes).
        n_volumes: volumes (time points) in the series.
        shape: (slices per volume, rows, cols) before any reformatting.
        spacing: (slice, row, col) mm; slice spacing 0.0 when unknown or single slice.
        orientation: "axial"/"coronal"/"sagittal"[" oblique"] or "2D".
        transfer_syntaxes: transfer syntax names (NIfTI: "NIfTI <dtype>").
        warnings: geometry and content findings (gaps, tilt, 4D, duplicates, scouts).
        n_gaps: missing slices detected between positions (not filled).
        tilt_deg: gantry tilt / shear angle in degrees (0 when none).
        body_part: body part as a vocabulary term (``ingest.anatomy``: "HEAD", "BRAIN",
            "CHEST"...), from BodyPartExamined or the descriptions; "" when the header says none.
        view: radiograph ViewPosition ("PA", "AP", "LL"...); "" when absent.
        age_years: the patient's age at the study in completed years (``ingest.age``), None
            when the headers cannot say. For scope matching only, in memory: never in
            ``to_dict`` (so never sent, stored or printed), nor in ``repr``.
    """

    series_key: str
    study_key: str
    kind: str
    modality: str
    files: tuple[str, ...]
    n_slices: int = 0
    n_volumes: int = 1
    shape: tuple[int, ...] = ()
    spacing: tuple[float, ...] = ()
    orientation: str = ""
    transfer_syntaxes: tuple[str, ...] = ()
    warnings: tuple[str, ...] = ()
    n_gaps: int = 0
    tilt_deg: float = 0.0
    body_part: str = ""
    view: str = ""
    spares: tuple[str, ...] = ()
    age_years: int | None = field(default=None, repr=False, compare=False)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (tuples become lists), without the in-memory ``age_years``."""
        return {
            k: list(v) if isinstance(v, tuple) else v
            for k, v in asdict(self).items()
            if k not in IN_MEMORY_ONLY
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SeriesRef:
        """Inverse of ``to_dict``; unknown keys are an error naming them."""
        names = {f.name for f in fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"SeriesRef: unknown keys {sorted(unknown)}")
        kw = {k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}
        return cls(**kw)


@dataclass(frozen=True)
class FileRecord:
    """The fate of one file seen: status "used" / "skipped" / "failed", with the reason."""

    path: str
    status: str
    reason: str = ""
    series_key: str | None = None


@dataclass
class Discovery:
    """What ``discover`` found: series to decode and one record per file seen."""

    root: Path
    series: list[SeriesRef] = field(default_factory=list)
    files: list[FileRecord] = field(default_factory=list)

    def counts(self) -> dict[str, int]:
        """{"seen", "used", "skipped", "failed"}; seen = used + skipped + failed."""
        c = Counter(r.status for r in self.files)
        return {"seen": len(self.files), **{s: c.get(s, 0) for s in STATUSES}}

    def errors(self) -> list[FileRecord]:
        """Records of skipped and failed files."""
        return [r for r in self.files if r.status != "used"]


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
    """A decoded series: its reference, modality, volumes and warnings (no identifiers).

    ``unreadable``: the files of ``ref`` left out because they could not be read or decoded,
    each with why (the reason names no path); they are ``failed`` inputs of a screen.
    """

    ref: SeriesRef
    modality: str
    volumes: list[Volume]
    warnings: list[str] = field(default_factory=list)
    unreadable: dict[str, str] = field(default_factory=dict)

    @property
    def n_slices(self) -> int:
        """Slices over all volumes."""
        return sum(v.data.shape[0] for v in self.volumes)
