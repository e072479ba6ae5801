"""The documents written back to a PACS (SR, KOS, Secondary Capture overlays), built by the real
builders from synthetic source images: they state the study outcome truthfully, name the model
that scored the study, carry a complete file meta group as sent by STOW-RS, and (where
dicom3tools is installed) ``dciodvfy`` reports no error for any of them."""

from __future__ import annotations

import io
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest
from dicom_factory import write_ct_series

from pdd_batch.review.pacs_documents import build_kos, build_sr
from pdd_batch.review.pacs_export import EVIDENCE_KEYWORDS, IMAGE_KEYWORDS, complete_file_meta
from pdd_batch.review.pacs_overlays import _comment
from pdd_batch.review.pacs_types import ModelRef, ResolvedSlice, SliceRef, StudyTarget
from pdd_batch.review.secondary_capture import ScSource, ScStudy, sc_dataset

MODEL = ModelRef("head-ct-model-1", "ab" * 32, 4.54, "20261207T101500Z-abc123", "2026-12-07")


def _evidence(path: Path) -> pydicom.Dataset:
    """The header attributes ``pacs_export.evidence_dataset`` keeps from a source image."""
    src = pydicom.dcmread(path)
    ds = pydicom.Dataset()
    for keyword in (*EVIDENCE_KEYWORDS, *IMAGE_KEYWORDS):
        setattr(ds, keyword, src.get(keyword))
    return ds


def _resolved(paths: list[Path], ood: list[bool], flagged: list[bool]) -> list[ResolvedSlice]:
    out = []
    for i, (p, o, f) in enumerate(zip(paths, ood, flagged, strict=True)):
        ev = _evidence(p)
        ref = SliceRef("series", f"file{i}", 5.0 - i, f, o)
        out.append(ResolvedSlice(ref, str(ev.SOPClassUID), str(ev.SOPInstanceUID), ev))
    return out


def _target(decision: str, reason: str | None, refs: list[ResolvedSlice]) -> StudyTarget:
    n_ood = sum(bool(r.slice.out_of_distribution) for r in refs)
    return StudyTarget(
        study_key="study-key",
        model=MODEL,
        decision=decision,
        reason=reason,
        n_slices=len(refs),
        n_assessed=len(refs) - n_ood,
        n_out_of_distribution=n_ood,
        max_score=5.0,
        slices=tuple(r.slice for r in refs),
    )


def sr_items(ds: pydicom.Dataset) -> dict[str, list]:
    """Concept meaning -> values (text, number) of the SR's root container items."""
    out: dict[str, list] = {}
    for item in ds.ContentSequence:
        name = item.ConceptNameCodeSequence[0].CodeMeaning
        if item.ValueType == "TEXT":
            out.setdefault(name, []).append(item.TextValue)
        elif item.ValueType == "NUM":
            out.setdefault(name, []).append(float(item.MeasuredValueSequence[0].NumericValue))
    return out


def kos_description(ds: pydicom.Dataset) -> str:
    texts = [
        item.TextValue
        for item in ds.ContentSequence
        if item.ValueType == "TEXT" and item.RelationshipType == "CONTAINS"
    ]
    assert len(texts) == 1
    return texts[0]


def as_sent(ds: pydicom.Dataset) -> bytes:
    """The bytes STOW-RS sends: dicomweb-client writes ``pydicom.dcmwrite(buffer, ds)`` as is."""
    buffer = io.BytesIO()
    pydicom.dcmwrite(buffer, complete_file_meta(ds))
    return buffer.getvalue()


@pytest.fixture(scope="module")
def sources(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    root = tmp_path_factory.mktemp("src")
    return write_ct_series(root / "ct", n_slices=3, rows=32, cols=32, seed=5)


def test_a_not_assessed_study_is_never_called_flagged(sources) -> None:
    refs = _resolved(sources, [True, True, False], [False, False, False])
    reason = "2/3 slices out of distribution (at least 50% must be assessed)"
    target = _target("not_assessed", reason, refs)
    sr, kos = build_sr(target, refs), build_kos(target, refs)
    items = sr_items(sr)
    assert items["Study outcome"] == ["not_assessed"]
    assert items["Reason not assessed"] == [reason]
    assert items["Slices assessed"] == [1.0] and items["Slices out of distribution"] == [2.0]
    description = kos_description(kos)
    assert "flagged images" not in description and "none flagged" in description
    assert description.count("not_assessed: 2/3 slices out of distribution") == 1
    statuses = [
        child.TextValue
        for item in sr.ContentSequence
        if item.ConceptNameCodeSequence[0].CodeMeaning == "Slice anomaly score"
        for child in item.ContentSequence
        if child.ValueType == "TEXT"
    ]
    assert statuses == ["out of distribution (not assessed)"] * 2


def test_documents_name_their_model_threshold_and_date(sources) -> None:
    refs = _resolved(sources[:2], [False, False], [True, True])
    target = _target("flagged", None, refs)
    sr, kos = build_sr(target, refs), build_kos(target, refs)
    items = sr_items(sr)
    assert items["Model id"] == [MODEL.model_id]
    assert items["Checkpoint hash"] == [MODEL.checkpoint_hash]
    assert items["Decision threshold"] == [pytest.approx(MODEL.threshold)]
    assert "2 flagged images" in kos_description(kos)
    for ds in (sr, kos):
        assert MODEL.model_id in ds.SeriesDescription and MODEL.run_date in ds.SeriesDescription
        assert len(ds.SeriesDescription) <= 64
    observers = [
        item.TextValue
        for item in sr.ContentSequence
        if item.ValueType == "TEXT" and item.RelationshipType == "HAS OBS CONTEXT"
    ]
    assert MODEL.model_id in observers  # the model is the device observer
    assert sr.CodingSchemeIdentificationSequence[0].CodingSchemeDesignator == "99PDD"


def _overlay(source: Path) -> pydicom.Dataset:
    ev = _evidence(source)
    study = ScStudy(str(ev.StudyInstanceUID), "pid", "name^x", "20200101", False, "YES")
    ref = ResolvedSlice(SliceRef("s", "f", 5.0, True), ev.SOPClassUID, ev.SOPInstanceUID, ev)
    comment = _comment({"slice_index": 0, "score": 5.0}, ref)
    rgb = np.zeros((8, 8, 3), np.uint8)
    src = ScSource(str(ev.SOPClassUID), str(ev.SOPInstanceUID))
    return sc_dataset(rgb, study, "1.2.826.0.1.3680043.8.498.7", 1, comment, src, "PDD overlays")


def test_overlay_points_at_its_source_slice_by_uid_and_instance_number(sources) -> None:
    source = pydicom.dcmread(sources[2])
    sc = _overlay(sources[2])
    (ref,) = sc.SourceImageSequence
    assert ref.ReferencedSOPInstanceUID == source.SOPInstanceUID
    assert ref.ReferencedSOPClassUID == source.SOPClassUID
    assert f"source image {source.InstanceNumber} " in sc.ImageComments


def test_every_document_is_sent_with_a_complete_file_meta_group(sources) -> None:
    refs = _resolved(sources[:1], [False], [True])
    target = _target("flagged", None, refs)
    for ds in (build_sr(target, refs), build_kos(target, refs), _overlay(sources[0])):
        back = pydicom.dcmread(io.BytesIO(as_sent(ds)))
        meta = back.file_meta
        assert "FileMetaInformationGroupLength" in meta and "FileMetaInformationVersion" in meta
        assert meta.MediaStorageSOPInstanceUID == back.SOPInstanceUID


@pytest.mark.skipif(shutil.which("dciodvfy") is None, reason="dciodvfy (dicom3tools) absent")
def test_dciodvfy_reports_no_error_for_sr_kos_and_sc(sources, tmp_path: Path) -> None:
    refs = _resolved(sources, [True, False, False], [False, True, False])
    flagged = _target("flagged", None, refs)
    unassessed = _target("not_assessed", "model not calibrated (no threshold)", refs)
    documents = {
        "sr": build_sr(flagged, refs),
        "kos": build_kos(flagged, refs),
        "sr_not_assessed": build_sr(unassessed, refs),
        "kos_not_assessed": build_kos(unassessed, refs),
        "sc": _overlay(sources[1]),
    }
    for name, ds in documents.items():
        path = tmp_path / f"{name}.dcm"
        path.write_bytes(as_sent(ds))
        run = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=60)
        report = run.stdout + run.stderr
        errors = [line for line in report.splitlines() if line.startswith("Error")]
        assert not errors, (name, errors)
        assert report.strip(), name  # dciodvfy ran and said what it checked


def test_no_import_circle_among_review_and_run_modules_even_through_lazy_imports() -> None:
    """``pacs_export`` and ``pacs_documents`` used to import each other (issue 24 item 6)."""
    from test_import_cycles import REPO, find_cycle, import_graph, project_packages

    graph = import_graph(REPO, project_packages(REPO), lazy=True)
    ours = ("pdd_batch.review", "pdd_batch.runs")
    sub = {
        k: {v for v in vs if v.startswith(ours)} for k, vs in graph.items() if k.startswith(ours)
    }
    assert find_cycle(sub) is None
