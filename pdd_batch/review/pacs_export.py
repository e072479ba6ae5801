"""Results back to the PACS: per flagged study, a DICOM Comprehensive SR (model, checkpoint hash,
threshold, decision, each flagged slice's score referencing its source image) and a Key Object
Selection document ("Of Interest") pointing at the flagged images, stored into the original study
with STOW-RS.

A run holds no raw UIDs, so the source images are found again on the PACS: a QIDO-RS series search
(the run's recorded query filters) matched by recomputing the run's series keys, then the series'
instances matched by recomputing the run's file keys of their places in the series cache
(``ingest.dicomweb.cache_relative_path``). Patient and study attributes of the documents come
from the source images' WADO-RS metadata. SOP Instance UIDs derive from the model's checkpoint
hash and the study key, so exporting again replaces the documents rather than adding new ones.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path
from typing import Any

import pyarrow as pa

from pdd_batch.ingest.dicomweb import (
    PACS_FOLDER,
    QUERY_STATE,
    TAG_SOP_UID,
    DicomwebError,
    Endpoint,
    Query,
    SeriesHit,
    cache_relative_path,
    http_failure,
    make_client,
    paged,
)
from pdd_batch.ingest.keys import file_key, series_key
from pdd_batch.review.pacs_documents import build_kos, build_sr
from pdd_batch.review.pacs_types import (  # noqa: F401 - re-exported: this module's API
    KOS_SERIES_NUMBER,
    MANUFACTURER,
    NOT_FOR_DIAGNOSIS,
    SCHEME,
    SR_SERIES_NUMBER,
    SliceRef,
    StudyTarget,
    document_uids,
)
from pdd_batch.runs.results import RunResults

log = logging.getLogger(__name__)

TAG_SOP_CLASS = "00080016"
MAX_REFERENCED = 100  # slices listed per study (highest scores first)
FALLBACK_SLICES = 3  # a study exported by --top/--min-score without flagged slices
# Header attributes the documents copy from a source image (patient, study, equipment-free).
EVIDENCE_KEYWORDS = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyInstanceUID",
    "StudyDate",
    "StudyTime",
    "StudyID",
    "AccessionNumber",
    "ReferringPhysicianName",
    "SeriesInstanceUID",
    "Modality",
    "SOPClassUID",
    "SOPInstanceUID",
)
IMAGE_KEYWORDS = ("Rows", "Columns")  # copied when present: the KOS then lists IMAGE items


@dataclass
class PacsExportSummary:
    """What was stored: studies, instances (SR + KOS), and errors by study key."""

    studies: list[str] = field(default_factory=list)
    instances: int = 0
    errors: dict[str, str] = field(default_factory=dict)


def export_targets(
    results: RunResults, top: int | None = None, min_score: float | None = None
) -> list[StudyTarget]:
    """The studies to write back (``RunResults.flagged_studies``) with their referenced slices:
    the flagged ones, else (a study chosen by ``top``/``min_score``) the top few."""
    targets = []
    for study in results.flagged_studies(top=top, min_score=min_score).to_pylist():
        slices = tuple(_slice_refs(reported_slices(results, study["study_key"])))
        targets.append(
            StudyTarget(study["study_key"], study["decision"], float(study["max_score"]), slices)
        )
    return targets


def reported_slices(results: RunResults, study_key: str) -> pa.Table:
    """The slices a study's documents report: its flagged ones (highest scores first, at most
    ``MAX_REFERENCED``), else its top few."""
    rows = results.top_slices(study_key, k=MAX_REFERENCED, flagged_only=True)
    if rows.num_rows == 0:
        rows = results.top_slices(study_key, k=FALLBACK_SLICES)
    return rows


def _slice_refs(rows: pa.Table) -> Iterator[SliceRef]:
    for r in rows.select(["series_key", "file_key", "score", "flagged"]).to_pylist():
        yield SliceRef(r["series_key"], r["file_key"], float(r["score"]), bool(r["flagged"]))


def recorded_query(run_dir: Path) -> Query:
    """The widest query this run folder's PACS runs asked (earliest ``since``, same modality)."""
    path = Path(run_dir) / PACS_FOLDER / QUERY_STATE
    if not path.is_file():
        return Query()
    record = json.loads(path.read_text())
    since = record.get("earliest_since")
    return Query(
        since=date.fromisoformat(since) if since else None, modality=record.get("modality")
    )


def find_series(client: Any, query: Query, wanted: set[str]) -> dict[str, SeriesHit]:
    """Series key -> the PACS series (QIDO-RS, paged; stops once every wanted key is found)."""
    found: dict[str, SeriesHit] = {}
    for item in paged(client.search_for_series, search_filters=query.series_filters()):
        study_uid, series_uid = _value(item, "0020000D"), _value(item, "0020000E")
        key = series_key(study_uid, series_uid)
        if key in wanted:
            found[key] = SeriesHit(study_uid, series_uid)
            if len(found) == len(wanted):
                break
    return found


def find_instances(client: Any, hit: SeriesHit) -> dict[str, tuple[str, str]]:
    """The run's file key of each instance's place in the series cache -> (SOP Class UID,
    SOP Instance UID), by QIDO-RS."""
    out = {}
    items = paged(
        client.search_for_instances,
        study_instance_uid=hit.study_uid,
        series_instance_uid=hit.series_uid,
    )
    for item in items:
        sop = _value(item, TAG_SOP_UID)
        out[file_key(cache_relative_path(hit.key, sop))] = (_value(item, TAG_SOP_CLASS), sop)
    return out


def _value(item: dict, tag: str) -> str:
    values = item.get(tag, {}).get("Value") or [""]
    return str(values[0])


def evidence_dataset(client: Any, hit: SeriesHit, sop_uid: str) -> Any:
    """The header attributes of a source image the documents need (WADO-RS metadata)."""
    from pydicom import Dataset

    meta = client.retrieve_instance_metadata(hit.study_uid, hit.series_uid, sop_uid)
    keep = {}
    for tag, element in meta.items():
        if "BulkDataURI" in element or "InlineBinary" in element:
            continue
        keep[tag] = element
    full = Dataset.from_json(keep)
    ds = Dataset()
    for keyword in EVIDENCE_KEYWORDS:  # type 2 attributes a source lacks are written empty
        setattr(ds, keyword, full.data_element(keyword).value if keyword in full else None)
    for keyword in IMAGE_KEYWORDS:
        if keyword in full:
            setattr(ds, keyword, full.data_element(keyword).value)
    return ds


def export_to_pacs(
    results: RunResults,
    endpoint: Endpoint,
    top: int | None = None,
    min_score: float | None = None,
    secondary_capture: bool = False,
) -> PacsExportSummary:
    """Store an SR and a KOS (and with ``secondary_capture`` a series of heatmap overlays,
    ``pacs_overlays.py``) into each selected study's original study on the PACS.

    A study whose images cannot be found again (or whose store fails) is an error of the
    summary, by study key; the others are still written.

    Raises:
        DicomwebAuthError: credentials refused.
        DicomwebError: the PACS could not be queried.
    """
    client = make_client(endpoint)
    targets = export_targets(results, top=top, min_score=min_score)
    wanted = {s.series_key for t in targets for s in t.slices}
    query = recorded_query(results.run_dir)
    series = _http("QIDO-RS series search", find_series, client, query, wanted) if wanted else {}
    summary = PacsExportSummary()
    provenance = _provenance(results)
    overlays = _Overlays(results, targets) if secondary_capture and targets else None
    for target in targets:
        try:
            refs = _resolve(client, target, series)
            documents = _documents(target, refs, provenance)
            if overlays is not None:
                documents += overlays.datasets(target, refs[0].evidence, provenance)
            _store(client, documents)
        except DicomwebError as exc:
            summary.errors[target.study_key] = str(exc)
            continue
        summary.studies.append(target.study_key)
        summary.instances += len(documents)
    log.info("PACS export: %d studies, %d errors", len(summary.studies), len(summary.errors))
    return summary


class _Overlays:
    """The heatmap overlays of an export: one colour scale, sources from the series cache."""

    def __init__(self, results: RunResults, targets: list[StudyTarget]) -> None:
        from pdd_batch.review.pacs_overlays import cache_locator, overlay_scale

        self.results = results
        self.locator = cache_locator(results)
        self.rows = {
            t.study_key: reported_slices(results, t.study_key).to_pylist() for t in targets
        }
        self.scale = overlay_scale([r for rows in self.rows.values() for r in rows])

    def datasets(self, target: StudyTarget, evidence: Any, provenance: dict) -> list[Any]:
        from pdd_batch.review.pacs_overlays import overlay_datasets

        seed = (str(provenance["checkpoint_hash"]), target.study_key)
        return overlay_datasets(
            self.rows[target.study_key], evidence, self.locator, self.scale, seed
        )


def _documents(target: StudyTarget, refs: list[Any], provenance: dict[str, Any]) -> list[Any]:
    """The SR and the KOS of a study (raises ``DicomwebError`` for a header highdicom refuses)."""

    try:
        return [build_sr(target, refs, provenance), build_kos(target, refs, provenance)]
    except (ValueError, TypeError, AttributeError) as exc:
        reason = f"SR/KOS not built from the source headers ({type(exc).__name__})"
        raise DicomwebError(reason) from None


def _store(client: Any, documents: list[Any]) -> None:
    """STOW-RS into the documents' study (raises a path-free ``DicomwebError``).

    Each is sent as a DICOM file (preamble, "DICM", complete file meta): dicomweb-client writes
    a dataset as it is, and an archive stores the bytes it receives.
    """
    import requests
    from pydicom.dataset import validate_file_meta
    from retrying import RetryError

    for ds in documents:
        ds.ensure_file_meta()
        validate_file_meta(ds.file_meta, enforce_standard=True)
        ds.preamble = getattr(ds, "preamble", None) or b"\x00" * 128
    try:
        client.store_instances(documents, study_instance_uid=str(documents[0].StudyInstanceUID))
    except (requests.RequestException, RetryError) as exc:
        raise http_failure("STOW-RS store", exc) from None


def _provenance(results: RunResults) -> dict[str, Any]:
    threshold = results.manifest.get("threshold")
    if threshold is None and results.slices.num_rows:
        threshold = results.slices.column("threshold")[0].as_py()
    return {
        "model_id": results.model_id or "unknown",
        "checkpoint_hash": results.checkpoint_hash or "unknown",
        "threshold": threshold,
        "run_id": str(results.manifest.get("run_id", "")),
    }


@dataclass(frozen=True)
class ResolvedSlice:
    """A slice with its source image found on the PACS (UIDs in memory only)."""

    slice: SliceRef
    sop_class_uid: str
    sop_instance_uid: str
    evidence: Any  # pydicom Dataset


def _resolve(client: Any, target: StudyTarget, series: dict[str, SeriesHit]) -> list[Any]:
    instances: dict[str, dict[str, tuple[str, str]]] = {}
    evidence: dict[str, Any] = {}
    out = []
    for ref in target.slices:
        hit = series.get(ref.series_key)
        if hit is None:
            raise DicomwebError("series not found on the PACS (query filters of the run)")
        if ref.series_key not in instances:
            instances[ref.series_key] = _http(
                "QIDO-RS instance search", find_instances, client, hit
            )
        found = instances[ref.series_key].get(ref.file_key)
        if found is None:
            raise DicomwebError("source image not found on the PACS (screened from a folder?)")
        sop_class, sop_uid = found
        if sop_uid not in evidence:
            evidence[sop_uid] = _http("WADO-RS metadata", evidence_dataset, client, hit, sop_uid)
        out.append(ResolvedSlice(ref, sop_class, sop_uid, evidence[sop_uid]))
    return out


def _http(what: str, fn: Any, *args: Any) -> Any:
    """``fn(*args)`` with HTTP failures turned into a path-free ``DicomwebError``."""
    import requests
    from retrying import RetryError

    try:
        return fn(*args)
    except (requests.RequestException, RetryError) as exc:
        raise http_failure(what, exc) from None
