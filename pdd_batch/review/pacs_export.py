"""Results back to the PACS: per selected study and per model that scored it, a DICOM
Comprehensive SR (that model's id, checkpoint hash and own threshold, the study outcome with its
reason, each reported slice's score referencing its source image) and a Key Object Selection
document ("Of Interest") pointing at the reported images, stored into the original study with
STOW-RS. Without ``--top``/``--min-score`` the flagged studies are selected; ``--top N`` takes
the review queue (flagged, then not assessed), and the documents of a not-assessed study say so
(never "flagged images").

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
import pyarrow.compute as pc

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
from pdd_batch.review.pacs_types import ModelRef, ResolvedSlice, SliceRef, StudyTarget, run_date
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
# copied when present: the KOS then lists IMAGE items; the overlays name their source slice
IMAGE_KEYWORDS = ("Rows", "Columns", "InstanceNumber")


@dataclass
class PacsExportSummary:
    """What was stored: studies, instances (SR + KOS), and errors by study key."""

    studies: list[str] = field(default_factory=list)
    instances: int = 0
    errors: dict[str, str] = field(default_factory=dict)


def export_targets(
    results: RunResults, top: int | None = None, min_score: float | None = None
) -> list[StudyTarget]:
    """The studies to write back (``RunResults.flagged_studies``: one row per study and
    model) with that model's provenance and outcome and their referenced slices: the flagged
    ones, else (a study chosen by ``top``/``min_score``) the top few."""
    targets = []
    rid = str(results.manifest.get("run_id", ""))
    for study in results.flagged_studies(top=top, min_score=min_score).to_pylist():
        rows = reported_slices(results, study["study_key"], study["model_id"])
        threshold = study.get("threshold")
        model = ModelRef(
            model_id=str(study["model_id"]),
            checkpoint_hash=str(study["checkpoint_hash"]),
            threshold=None if threshold is None else float(threshold),
            run_id=rid,
            run_date=run_date(rid),
        )
        n_ood = study.get("n_out_of_distribution") or 0
        n_assessed = study.get("n_assessed")
        targets.append(
            StudyTarget(
                study_key=study["study_key"],
                model=model,
                decision=study["decision"],
                reason=study.get("reason"),
                n_slices=int(study["n_slices"]),
                n_assessed=int(study["n_slices"] - n_ood if n_assessed is None else n_assessed),
                n_out_of_distribution=int(n_ood),
                max_score=float(study["max_score"]),
                slices=tuple(_slice_refs(rows)),
            )
        )
    return targets


def reported_slices(results: RunResults, study_key: str, model_id: str) -> pa.Table:
    """The slices a study's documents for one model report: its flagged ones (highest scores
    first, at most ``MAX_REFERENCED``), else its top few."""
    rows = results.study_slices(study_key)
    rows = rows.filter(pc.equal(rows.column("model_id"), model_id))
    flagged = rows.filter(rows.column("flagged"))
    if flagged.num_rows:
        return flagged.slice(0, MAX_REFERENCED)
    return rows.slice(0, FALLBACK_SLICES)


def _slice_refs(rows: pa.Table) -> Iterator[SliceRef]:
    has_ood = "out_of_distribution" in rows.column_names
    for r in rows.to_pylist():
        ood = r.get("out_of_distribution") if has_ood else None
        yield SliceRef(r["series_key"], r["file_key"], float(r["score"]), bool(r["flagged"]), ood)


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
    ``pacs_overlays.py``) per model into each selected study's original study on the PACS.

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
    overlays = _Overlays(results, targets) if secondary_capture and targets else None
    for target in targets:
        try:
            refs = _resolve(client, target, series)
            documents = _documents(target, refs)
            if overlays is not None:
                documents += overlays.datasets(target, refs)
            _store(client, documents)
        except DicomwebError as exc:
            summary.errors[target.study_key] = str(exc)
            continue
        if target.study_key not in summary.studies:
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
            (t.study_key, t.model.model_id): reported_slices(
                results, t.study_key, t.model.model_id
            ).to_pylist()
            for t in targets
        }
        self.scale = overlay_scale([r for rows in self.rows.values() for r in rows])

    def datasets(self, target: StudyTarget, refs: list[ResolvedSlice]) -> list[Any]:
        from pdd_batch.review.pacs_overlays import overlay_datasets

        rows = self.rows[(target.study_key, target.model.model_id)]
        return overlay_datasets(rows, refs, self.locator, self.scale, target)


def _documents(target: StudyTarget, refs: list[ResolvedSlice]) -> list[Any]:
    """The SR and the KOS of a study for one model (raises ``DicomwebError`` for a header
    highdicom refuses)."""
    from pdd_batch.review.pacs_documents import build_kos, build_sr

    try:
        return [build_sr(target, refs), build_kos(target, refs)]
    except (ValueError, TypeError, AttributeError) as exc:
        reason = f"SR/KOS not built from the source headers ({type(exc).__name__})"
        raise DicomwebError(reason) from None


def complete_file_meta(ds: Any) -> Any:
    """``ds`` with a complete, standard file meta group (group length and version included,
    which pydicom writes only when present) and a preamble: how every document is sent."""
    from pydicom.dataset import validate_file_meta

    ds.ensure_file_meta()
    validate_file_meta(ds.file_meta, enforce_standard=True)  # adds the version
    if "FileMetaInformationGroupLength" not in ds.file_meta:
        ds.file_meta.FileMetaInformationGroupLength = 0  # recomputed when written
    ds.preamble = getattr(ds, "preamble", None) or b"\x00" * 128
    return ds


def _store(client: Any, documents: list[Any]) -> None:
    """STOW-RS into the documents' study (raises a path-free ``DicomwebError``).

    Each is sent as a DICOM file (preamble, "DICM", complete file meta): dicomweb-client writes
    a dataset as it is, and an archive stores the bytes it receives.
    """
    import requests
    from retrying import RetryError

    for ds in documents:
        complete_file_meta(ds)
    try:
        client.store_instances(documents, study_instance_uid=str(documents[0].StudyInstanceUID))
    except (requests.RequestException, RetryError) as exc:
        raise http_failure("STOW-RS store", exc) from None


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
