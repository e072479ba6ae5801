"""What the documents written back to a PACS are built from (a leaf module: the export,
``pacs_export``, fills these; the builders, ``pacs_documents`` and ``pacs_overlays``, read them).

One target per study and per model that scored it: the documents name that model (id,
checkpoint hash, its own threshold) and state the study's outcome for it
(``pdd_batch.runs.outcome``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from pdd_batch.review.secondary_capture import derived_uid

SC_SERIES_NUMBER, SR_SERIES_NUMBER, KOS_SERIES_NUMBER = 9901, 9902, 9903
SCHEME = "99PDD"  # private coding scheme of the report's concepts
SCHEME_NAME = "pdd-batch anomaly screening concepts"
MANUFACTURER = "pdd-batch"
NOT_FOR_DIAGNOSIS = "PDD anomaly screening (research use, not for diagnosis)"
SERIES_KINDS = {"sr": "PDD report", "kos": "PDD images", "sc": "PDD overlays"}
MAX_LO = 64  # characters of a LO value (SeriesDescription)


@dataclass(frozen=True)
class SliceRef:
    """A slice to report: its series, source file (by its run key), score and whether it was
    beyond the model's in-distribution check (None: the model has no check)."""

    series_key: str
    file_key: str
    score: float
    flagged: bool
    out_of_distribution: bool | None = None


@dataclass(frozen=True)
class ModelRef:
    """The model that scored a study: its id, checkpoint hash and own threshold (None:
    uncalibrated), and the run and its date (``YYYY-MM-DD``)."""

    model_id: str
    checkpoint_hash: str
    threshold: float | None
    run_id: str
    run_date: str


@dataclass(frozen=True)
class StudyTarget:
    """A study to write back for one model: its outcome and the slices to reference.

    Attributes:
        study_key: the study's key.
        model: the model that scored it.
        decision: ``flagged`` | ``normal`` | ``not_assessed``.
        reason: why it is not assessed (None otherwise).
        n_slices, n_assessed, n_out_of_distribution: slice counts of the study for the model.
        max_score: its highest slice score.
        slices: the slices the documents reference (highest scores first).
    """

    study_key: str
    model: ModelRef
    decision: str
    reason: str | None
    n_slices: int
    n_assessed: int
    n_out_of_distribution: int
    max_score: float
    slices: tuple[SliceRef, ...]

    @property
    def outcome_text(self) -> str:
        """``flagged``, ``normal``, or ``not_assessed: <reason>``."""
        return f"{self.decision}: {self.reason}" if self.reason else self.decision

    def images_text(self, n_images: int) -> str:
        """What the listed images are, truthfully for the outcome (a KOS description)."""
        if self.decision == "flagged":
            what = f"{n_images} flagged images"
        else:
            what = f"{n_images} highest-scoring images, none flagged"
        return f"{self.outcome_text} ({self.model.model_id}): {what}"


@dataclass(frozen=True)
class ResolvedSlice:
    """A slice with its source image found on the PACS (UIDs in memory only)."""

    slice: SliceRef
    sop_class_uid: str
    sop_instance_uid: str
    evidence: Any  # pydicom Dataset: patient, study and image attributes of the source


def document_uids(kind: str, checkpoint_hash: str, study_key: str) -> tuple[str, str]:
    """(series UID, SOP Instance UID) of a document: stable per model and study, so a
    re-export replaces it (no run-specific part)."""
    return (
        derived_uid("pdd-batch", kind, "series", checkpoint_hash, study_key),
        derived_uid("pdd-batch", kind, "instance", checkpoint_hash, study_key),
    )


def series_description(kind: str, model: ModelRef) -> str:
    """``PDD report <model id> <run date>``: two document series of one study, written after a
    model change, can be told apart in a viewer (at most 64 characters, a LO value)."""
    head, tail = SERIES_KINDS[kind], model.run_date
    room = MAX_LO - len(head) - len(tail) - 2
    return f"{head} {model.model_id[:room]} {tail}"


def run_date(run_id: str) -> str:
    """The date a run started (its id begins ``YYYYMMDDT``), else today (UTC)."""
    m = re.match(r"(\d{4})(\d{2})(\d{2})T", run_id or "")
    if m:
        return "-".join(m.groups())
    return datetime.now(timezone.utc).strftime("%Y-%m-%d")
