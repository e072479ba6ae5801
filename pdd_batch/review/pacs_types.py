"""The types and constants shared by the PACS export and its documents (a leaf module, so
``pacs_export`` and ``pacs_documents`` import it instead of each other)."""

from __future__ import annotations

from dataclasses import dataclass

from pdd_batch.review.secondary_capture import derived_uid

SR_SERIES_NUMBER, KOS_SERIES_NUMBER = 9902, 9903  # 9901: the overlays' Secondary Capture
SCHEME = "99PDD"  # private coding scheme of the report's concepts
MANUFACTURER = "pdd-batch"
NOT_FOR_DIAGNOSIS = "PDD anomaly screening (research use, not for diagnosis)"


@dataclass(frozen=True)
class SliceRef:
    """A slice to report: its series, source file (by its run key) and score."""

    series_key: str
    file_key: str
    score: float
    flagged: bool


@dataclass(frozen=True)
class StudyTarget:
    """A study to write back: its decision, max score and the slices to reference."""

    study_key: str
    decision: str
    max_score: float
    slices: tuple[SliceRef, ...]


def document_uids(kind: str, checkpoint_hash: str, study_key: str) -> tuple[str, str]:
    """(series UID, SOP Instance UID) of a document: stable per model and study, so a
    re-export replaces it (no run-specific part)."""
    return (
        derived_uid("pdd-batch", kind, "series", checkpoint_hash, study_key),
        derived_uid("pdd-batch", kind, "instance", checkpoint_hash, study_key),
    )
