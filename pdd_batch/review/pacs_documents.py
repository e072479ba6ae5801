"""The two DICOM documents written back to a PACS per study and model (highdicom):

- a Comprehensive SR: the model as the device observer (TID 1004: its id as name and model name,
  a UID from its checkpoint hash), then the model id, checkpoint hash, the model's own decision
  threshold, the study outcome (``flagged`` / ``normal`` / ``not_assessed``) with its reason,
  the assessed and out-of-distribution slice counts, the max score, and one numeric item per
  reported slice (its anomaly score; "out of distribution" when it was) inferred from an image
  item referencing the slice's source image;
- a Key Object Selection document titled "Of Interest" (DCM 113000) listing the reported
  images, whose description states the outcome: "flagged images" only for a flagged study.

Both take patient and study attributes from the source images' headers, carry stable SOP
Instance UIDs (``pacs_types.document_uids``: per model and study), a series description naming
the model and the run's date, declare the private coding scheme of their concepts and say they
are not for diagnosis.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import highdicom as hd
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes

from pdd_batch.review.pacs_types import (
    KOS_SERIES_NUMBER,
    MANUFACTURER,
    NOT_FOR_DIAGNOSIS,
    SCHEME,
    SCHEME_NAME,
    SR_SERIES_NUMBER,
    ResolvedSlice,
    StudyTarget,
    document_uids,
    series_description,
)
from pdd_batch.review.secondary_capture import derived_uid

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


def _slice_item(resolved: ResolvedSlice) -> hd.sr.NumContentItem:
    """A slice's score, inferred from (a reference to) its source image; a slice beyond the
    model's in-distribution check says so (its score was not assessed)."""
    item = _num("PDD-SLICE-SCORE", "Slice anomaly score", resolved.slice.score)
    children: list[Any] = [
        hd.sr.ImageContentItem(
            concept("PDD-SOURCE-IMAGE", "Source image"),
            resolved.sop_class_uid,
            resolved.sop_instance_uid,
            relationship_type="INFERRED FROM",
        )
    ]
    if resolved.slice.out_of_distribution:
        children.append(
            hd.sr.TextContentItem(
                concept("PDD-SLICE-STATUS", "Slice status"),
                "out of distribution (not assessed)",
                relationship_type="HAS PROPERTIES",
            )
        )
    item.ContentSequence = hd.sr.ContentSequence(children, is_root=False)
    return item


def device_observer(target: StudyTarget) -> hd.sr.ObserverContext:
    """The model as the device that made the observations (TID 1004)."""
    model = target.model
    return hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=derived_uid("pdd-batch", "model", model.checkpoint_hash),
            name=model.model_id[:64],
            manufacturer_name=MANUFACTURER,
            model_name=model.model_id[:64],
        ),
    )


def report_content(target: StudyTarget, resolved: list[ResolvedSlice]) -> Any:
    """The SR content tree (root container)."""
    model = target.model
    items: list[Any] = [
        *device_observer(target),
        _text("PDD-NOTE", "Note", NOT_FOR_DIAGNOSIS),
        _text("PDD-MODEL", "Model id", model.model_id),
        _text("PDD-CHECKPOINT", "Checkpoint hash", model.checkpoint_hash),
        _text("PDD-OUTCOME", "Study outcome", target.decision),
    ]
    if target.reason:
        items.append(_text("PDD-REASON", "Reason not assessed", target.reason))
    items += [
        _num("PDD-N-SLICES", "Slices scored", target.n_slices),
        _num("PDD-N-ASSESSED", "Slices assessed", target.n_assessed),
        _num("PDD-N-OOD", "Slices out of distribution", target.n_out_of_distribution),
        _num("PDD-MAX-SCORE", "Study max anomaly score", target.max_score),
    ]
    if model.threshold is not None:
        items.append(_num("PDD-THRESHOLD", "Decision threshold", model.threshold))
    items.extend(_slice_item(r) for r in resolved)
    root = hd.sr.ContainerContentItem(concept("PDD-REPORT", "PDD anomaly screening report"))
    root.ContentSequence = hd.sr.ContentSequence(items, is_root=False)
    return hd.sr.ContentSequence([root], is_root=True)


def _declare_scheme(ds: Dataset) -> Dataset:
    """Declare the private coding scheme of the document's concepts (PS3.3 C.12.1.1.4)."""
    scheme = Dataset()
    scheme.CodingSchemeDesignator = SCHEME
    scheme.CodingSchemeName = SCHEME_NAME
    scheme.CodingSchemeResponsibleOrganization = MANUFACTURER
    ds.CodingSchemeIdentificationSequence = [scheme]
    return ds


def _evidence(resolved: list[ResolvedSlice]) -> list[Any]:
    seen: dict[str, Any] = {}
    for r in resolved:
        seen.setdefault(r.sop_instance_uid, r.evidence)
    return list(seen.values())


def build_sr(target: StudyTarget, resolved: list[ResolvedSlice]) -> Any:
    """The Comprehensive SR of one study for one model (a pydicom Dataset ready for STOW-RS)."""
    series_uid, sop_uid = document_uids("sr", target.model.checkpoint_hash, target.study_key)
    with _quiet_name_checks():
        sr = hd.sr.ComprehensiveSR(
            evidence=_evidence(resolved),
            content=report_content(target, resolved),
            series_instance_uid=series_uid,
            series_number=SR_SERIES_NUMBER,
            sop_instance_uid=sop_uid,
            instance_number=1,
            manufacturer=MANUFACTURER,
            is_complete=True,
            series_description=series_description("sr", target.model),
        )
    return _declare_scheme(sr)


def build_kos(target: StudyTarget, resolved: list[ResolvedSlice]) -> Any:
    """The Key Object Selection ("Of Interest") of one study's reported images for one model;
    its description states the outcome (``StudyTarget.images_text``)."""
    series_uid, sop_uid = document_uids("kos", target.model.checkpoint_hash, target.study_key)
    evidence = _evidence(resolved)
    with _quiet_name_checks():
        content = hd.ko.KeyObjectSelection(
            document_title=codes.DCM.OfInterest,
            referenced_objects=evidence,
            observer_device_context=device_observer(target),
            description=f"{NOT_FOR_DIAGNOSIS}. {target.images_text(len(evidence))}",
        )
        return hd.ko.KeyObjectSelectionDocument(
            evidence=evidence,
            content=content,
            series_instance_uid=series_uid,
            series_number=KOS_SERIES_NUMBER,
            sop_instance_uid=sop_uid,
            instance_number=1,
            manufacturer=MANUFACTURER,
            series_description=series_description("kos", target.model),
        )
