"""The two DICOM documents written back to a PACS per flagged study (highdicom):

- a Comprehensive SR: the model id, checkpoint hash, decision threshold, the study decision and
  max score, and one numeric item per reported slice (its anomaly score) inferred from an image
  item referencing the slice's source image;
- a Key Object Selection document titled "Of Interest" (DCM 113000) listing the flagged images,
  which viewers and worklists show as the study's key images.

Both take patient and study attributes from the source images' headers, carry stable SOP
Instance UIDs (``pacs_export.document_uids``) and say they are not for diagnosis.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import highdicom as hd
from pydicom.sr.codedict import codes

from pdd_batch.review.pacs_types import (
    KOS_SERIES_NUMBER,
    MANUFACTURER,
    NOT_FOR_DIAGNOSIS,
    SCHEME,
    SR_SERIES_NUMBER,
    StudyTarget,
    document_uids,
)

NO_UNITS = hd.sr.CodedConcept("1", "UCUM", "no units")


@contextmanager
def _quiet_name_checks() -> Iterator[None]:
    """highdicom warns about a person name by quoting it: never print a patient's name."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*person name.*", category=UserWarning)
        yield


def concept(value: str, meaning: str) -> hd.sr.CodedConcept:
    """A concept of the project's private coding scheme."""
    return hd.sr.CodedConcept(value, SCHEME, meaning)


def _text(code: str, meaning: str, value: str) -> hd.sr.TextContentItem:
    return hd.sr.TextContentItem(concept(code, meaning), value, relationship_type="CONTAINS")


def _num(code: str, meaning: str, value: float) -> hd.sr.NumContentItem:
    return hd.sr.NumContentItem(
        concept(code, meaning), float(value), NO_UNITS, relationship_type="CONTAINS"
    )


def _slice_item(resolved: Any) -> hd.sr.NumContentItem:
    """A slice's score, inferred from (a reference to) its source image."""
    item = _num("PDD-SLICE-SCORE", "Slice anomaly score", resolved.slice.score)
    image = hd.sr.ImageContentItem(
        concept("PDD-SOURCE-IMAGE", "Source image"),
        resolved.sop_class_uid,
        resolved.sop_instance_uid,
        relationship_type="INFERRED FROM",
    )
    item.ContentSequence = hd.sr.ContentSequence([image], is_root=False)
    return item


def report_content(target: StudyTarget, resolved: list[Any], prov: dict[str, Any]) -> Any:
    """The SR content tree (root container)."""
    items = [
        _text("PDD-NOTE", "Note", NOT_FOR_DIAGNOSIS),
        _text("PDD-MODEL", "Model id", str(prov["model_id"])),
        _text("PDD-CHECKPOINT", "Checkpoint hash", str(prov["checkpoint_hash"])),
        _text("PDD-DECISION", "Study decision", target.decision),
        _num("PDD-MAX-SCORE", "Study max anomaly score", target.max_score),
    ]
    if prov["threshold"] is not None:
        items.append(_num("PDD-THRESHOLD", "Decision threshold", float(prov["threshold"])))
    items.extend(_slice_item(r) for r in resolved)
    root = hd.sr.ContainerContentItem(concept("PDD-REPORT", "PDD anomaly screening report"))
    root.ContentSequence = hd.sr.ContentSequence(items, is_root=False)
    return hd.sr.ContentSequence([root], is_root=True)


def _evidence(resolved: list[Any]) -> list[Any]:
    seen: dict[str, Any] = {}
    for r in resolved:
        seen.setdefault(r.sop_instance_uid, r.evidence)
    return list(seen.values())


def build_sr(target: StudyTarget, resolved: list[Any], prov: dict[str, Any]) -> Any:
    """The Comprehensive SR of one study (a pydicom Dataset ready for STOW-RS)."""
    series_uid, sop_uid = document_uids("sr", str(prov["checkpoint_hash"]), target.study_key)
    with _quiet_name_checks():
        return hd.sr.ComprehensiveSR(
            evidence=_evidence(resolved),
            content=report_content(target, resolved, prov),
            series_instance_uid=series_uid,
            series_number=SR_SERIES_NUMBER,
            sop_instance_uid=sop_uid,
            instance_number=1,
            manufacturer=MANUFACTURER,
            is_complete=True,
            series_description="PDD anomaly screening report",
        )


def build_kos(target: StudyTarget, resolved: list[Any], prov: dict[str, Any]) -> Any:
    """The Key Object Selection ("Of Interest") of one study's flagged images."""
    series_uid, sop_uid = document_uids("kos", str(prov["checkpoint_hash"]), target.study_key)
    evidence = _evidence(resolved)
    with _quiet_name_checks():
        content = hd.ko.KeyObjectSelection(
            document_title=codes.DCM.OfInterest,
            referenced_objects=evidence,
            description=f"{NOT_FOR_DIAGNOSIS}: {len(evidence)} flagged images",
        )
        return hd.ko.KeyObjectSelectionDocument(
            evidence=evidence,
            content=content,
            series_instance_uid=series_uid,
            series_number=KOS_SERIES_NUMBER,
            sop_instance_uid=sop_uid,
            instance_number=1,
            manufacturer=MANUFACTURER,
            series_description="PDD flagged images",
        )
