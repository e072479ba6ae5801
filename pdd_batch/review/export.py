"""Export flagged studies of a screening run for review, de-identified by default.

Selection (``RunResults.flagged_studies``): the flagged studies; ``top`` N: the first N of the
review queue (flagged, then not assessed; never a normal study); ``min_score``: by score, any
outcome. Each study is exported once, with its outcome (``runs.outcome``) for the model listed
first in that order; ``manifest.csv`` gives the outcome, its reason and the model.

Layout of ``OUT/``::

    OUT/export.json                     options used, run provenance, counts, error records
    OUT/manifest.csv                    one row per study: new ids, scores, files
    OUT/S001/dicom/series01/IM0001.dcm  the original instances (de-identified; pixels unchanged)
    OUT/S001/nifti/image.nii.gz         or the NIfTI image (header text stripped)
    OUT/S001/overlays/*.png             heatmap over the model-input slice, per flagged slice
    OUT/S001/secondary_capture/*.dcm    optional DICOM Secondary Capture series of the overlays

Studies are named ``S001``, ``S002``... by rank. No original identifier (names, IDs, UIDs,
dates, archive paths, run keys) is written into ``OUT`` when de-identifying; the crosswalk from
new to original identifiers goes, only when asked, to a separate file with mode 0600.

Pixels are never cleaned, so when de-identifying a DICOM file that may show burned-in text
(``burned_in.burned_in_risk``: BurnedInAnnotation=YES, or absent on a high-risk modality or a
screen capture) is not written, nor are the overlays built from it: both are listed in
``export.json`` and ``manifest.csv`` as "withheld: possible burned-in text" under the name they
would have had. ``allow_burned_in`` writes them, with a warning.

Every file is written atomically (a hidden temp file, then a rename) with mode 0600 in folders of
mode 0700, whatever the umask. A file that cannot be *written* (a full disk) stops the export with
``ExportWriteError`` naming the write; a source that cannot be *read* is an error record and the
export goes on.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import os
import secrets
import struct
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pydicom
from PIL import Image
from pydicom.errors import InvalidDicomError
from pydicom.uid import generate_uid

import pdd_batch
from pdd_batch.ingest.archive_io import MemberReader, split_member
from pdd_batch.ingest.dicom_headers import quiet_pydicom
from pdd_batch.ingest.reasons import exception_reason
from pdd_batch.review.burned_in import BurnedIn, burned_in_risk, inherited_flag
from pdd_batch.review.deid import Deidentifier, DeidError, deidentify_nifti_data
from pdd_batch.review.overlay import (
    SourceLocator,
    SourceNotFoundError,
    display_scale,
    model_input_slices,
    overlay_png,
)
from pdd_batch.review.secondary_capture import ScStudy, write_sc_series
from pdd_batch.runs.results import RunResults
from pdd_batch.runs.writer import (
    WriteError,
    ensure_private_dir,
    make_private,
    write_bytes_atomic,
)

log = logging.getLogger(__name__)

NIFTI_SUFFIXES = (".nii", ".nii.gz")
MANIFEST_COLUMNS = [
    "export_id", "rank", "kind", "modality", "decision", "reason", "model_id", "max_score",
    "topk_mean", "n_flagged", "n_assessed", "n_out_of_distribution", "n_slices",
    "new_study_uid", "new_patient_id", "files", "overlays", "secondary_capture",
    "withheld", "withheld_reason",
]  # fmt: skip
WITHHELD_REASON = "withheld: possible burned-in text"


class ExportError(ValueError):
    """Export options or an output folder that cannot be used (names the option)."""


class ExportWriteError(ExportError):
    """A file of the export could not be written (disk full, read-only...): the export stopped."""


def _write_out(data: bytes, dst: Path) -> None:
    """Write one export file (atomic, 0600); a failure stops the export as a *write* error."""
    try:
        write_bytes_atomic(data, dst)
    except WriteError as exc:
        raise ExportWriteError(f"{exc}; the export is incomplete") from exc


def _make_tree_private(folder: Path) -> None:
    """Folders 0700, files 0600 under ``folder`` (files written by helpers, e.g. SC series)."""
    for p in [folder, *folder.rglob("*")]:
        if not p.is_symlink():
            make_private(p)


@dataclass(frozen=True)
class ExportOptions:
    """How to export (recorded in ``export.json``).

    Attributes:
        top: export the first ``top`` studies of the review queue (flagged, then not
            assessed, each by score).
        min_score: export studies with ``max_score >= min_score`` (any outcome).
        deidentify: apply the PS3.15 basic profile (default); False keeps identifiers.
        secondary_capture: also write a DICOM Secondary Capture series of the overlays.
        crosswalk: file for the new -> original identifier table (mode 0600); None: not written.
        allow_burned_in: when de-identifying, also write the files that may show burned-in
            text (and their overlays), with a warning; by default they are withheld.
    """

    top: int | None = None
    min_score: float | None = None
    deidentify: bool = True
    secondary_capture: bool = False
    crosswalk: Path | None = None
    allow_burned_in: bool = False

    def __post_init__(self) -> None:
        if self.top is not None and self.top < 1:
            raise ExportError(f"top must be >= 1, got {self.top}")
        if self.min_score is not None and not math.isfinite(self.min_score):
            raise ExportError(f"min_score must be a finite number, got {self.min_score}")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["crosswalk"] = self.crosswalk is not None  # whether one was written, not where
        d["selection"] = (
            "decision == flagged"
            if self.top is None and self.min_score is None
            else "review queue (flagged, then not assessed)"
            if self.top is not None
            else "by score"
        )
        return d


@dataclass
class StudyExport:
    """What was written for one study."""

    export_id: str
    rank: int
    study: dict[str, Any]
    kind: str = "dicom"
    new_study_uid: str = ""
    new_patient_id: str = ""
    files: list[str] = field(default_factory=list)
    overlays: list[str] = field(default_factory=list)
    secondary_capture: list[str] = field(default_factory=list)
    crosswalk_files: list[dict[str, str]] = field(default_factory=list)
    withheld: list[str] = field(default_factory=list)  # names they would have had in OUT
    crosswalk_withheld: list[dict[str, str]] = field(default_factory=list)
    pixel_risk: dict[str, BurnedIn] = field(default_factory=dict)  # source file -> risk


@dataclass
class ExportSummary:
    """Counts and error records of an export (errors name study id and file number only)."""

    out_dir: Path
    studies: list[StudyExport] = field(default_factory=list)
    errors: list[dict[str, str]] = field(default_factory=list)
    warnings: list[dict[str, str]] = field(default_factory=list)
    withheld: list[dict[str, str]] = field(default_factory=list)

    @property
    def n_files(self) -> int:
        return sum(len(s.files) for s in self.studies)

    @property
    def n_overlays(self) -> int:
        return sum(len(s.overlays) for s in self.studies)


def _prepare_out(out_dir: Path, options: ExportOptions) -> None:
    if out_dir.exists() and any(out_dir.iterdir()):
        raise ExportError(f"--out {out_dir} exists and is not empty")
    if options.crosswalk is not None:
        cw = options.crosswalk.resolve()
        if cw == out_dir.resolve() or out_dir.resolve() in cw.parents:
            raise ExportError("--crosswalk must be outside the export folder (it re-identifies)")
    ensure_private_dir(out_dir)
    make_private(out_dir)


def export_run(
    results: RunResults,
    out_dir: Path,
    options: ExportOptions,
    locator: SourceLocator | None = None,
) -> ExportSummary:
    """Export the selected studies of a run into ``out_dir`` (must be new or empty).

    Args:
        results: the opened run.
        out_dir: new or empty export folder.
        options: what to export.
        locator: finds the source file behind each ``file_key`` (``SourceLocator.for_run``
            with the screened archive or the screening crosswalk); default: a 1.0 run's
            recorded archive root.

    Raises:
        ExportError: bad options, a non-empty ``out_dir``, or no way to find the source files.
        ExportWriteError: a file could not be written (the export stops there).
    """
    if locator is None:
        try:
            locator = SourceLocator.for_run(results)
        except SourceNotFoundError as exc:
            raise ExportError(str(exc)) from exc
    root = locator.root
    _prepare_out(out_dir, options)
    deid = Deidentifier() if options.deidentify else None
    summary = ExportSummary(out_dir)
    selected = _once_per_study(results.flagged_studies(options.top, options.min_score))
    scale = _display_scale(results, [s["study_key"] for s in selected])
    with MemberReader(root) as reader:
        for rank, study in enumerate(selected, start=1):
            item = StudyExport(export_id=f"S{rank:03d}", rank=rank, study=study)
            rows = locator.attach(results.study_slices(study["study_key"]).to_pylist())
            _export_sources(reader, rows, out_dir, item, deid, summary, options.allow_burned_in)
            _export_overlays(root, rows, out_dir, item, scale, options, summary)
            _warn_burned_in(item, summary)
            summary.studies.append(item)
    _write_manifest_csv(out_dir, summary)
    _write_export_json(out_dir, results, options, summary, scale)
    _make_tree_private(out_dir)
    if options.crosswalk is not None:
        write_crosswalk(options.crosswalk, summary, deid)
    log.info("exported %d studies, %d files, %d overlays, %d withheld, %d errors",
             len(summary.studies), summary.n_files, summary.n_overlays, len(summary.withheld),
             len(summary.errors))  # fmt: skip
    return summary


def _once_per_study(studies: pa.Table) -> list[dict]:
    """Study rows (one per study and model) with each study once, at its first place."""
    seen: dict[str, dict] = {}
    for row in studies.to_pylist():
        seen.setdefault(row["study_key"], row)
    return list(seen.values())


def _warn_burned_in(item: StudyExport, summary: ExportSummary) -> None:
    """Pixels are copied unchanged: say so for a study whose written files may show burned-in
    text (``--allow-burned-in``, or identifiers kept)."""
    written = [item.pixel_risk.get(f["source"]) for f in item.crosswalk_files]
    why = sorted({r.value for r in written if r is not None and r.possible})
    if why:
        warning = (
            f"{'; '.join(why)}: pixels are copied unchanged and may show identifying text; "
            "review before sharing"
        )
        summary.warnings.append({"study": item.export_id, "warning": warning})


def _withhold(
    summary: ExportSummary, item: StudyExport, name: str, risk: BurnedIn, source: str | None
) -> None:
    """Record a file or overlay that is not written because it may show burned-in text."""
    item.withheld.append(name)
    summary.withheld.append(
        {"study": item.export_id, "item": name, "reason": WITHHELD_REASON, "detail": risk.value}
    )
    if source is not None:
        item.crosswalk_withheld.append({"withheld": name, "source": source})


def _display_scale(results: RunResults, study_keys: list[str]) -> tuple[float, float]:
    """One colour scale for every overlay of the export (see ``overlay.display_scale``)."""
    rows = [r for k in study_keys for r in _overlay_rows(results.study_slices(k).to_pylist())]
    return display_scale(rows)


def _error(summary: ExportSummary, item: StudyExport, what: str, reason: str) -> None:
    summary.errors.append({"study": item.export_id, "item": what, "reason": reason})
    log.warning("export %s %s: %s", item.export_id, what, reason)


def _export_sources(
    reader: MemberReader,
    rows: list[dict],
    out_dir: Path,
    item: StudyExport,
    deid: Deidentifier | None,
    summary: ExportSummary,
    allow_burned_in: bool,
) -> None:
    """Copy (and de-identify) every source file of the study's slices; a file that may show
    burned-in text is withheld when de-identifying unless ``allow_burned_in``."""
    root = reader.root
    series_order = list(dict.fromkeys(r["series_key"] for r in rows))
    in_slice_order = sorted(
        rows,
        key=lambda r: (series_order.index(r["series_key"]), r["volume_index"], r["slice_index"]),
    )
    files = list(dict.fromkeys((r["series_key"], r["source_file"]) for r in in_slice_order))
    item.kind = "nifti" if files and files[0][1].endswith(NIFTI_SUFFIXES) else "dicom"
    counters: dict[str, int] = {}
    for n, (series_key, rel) in enumerate(files, start=1):
        s_idx = series_order.index(series_key) + 1
        counters[series_key] = counters.get(series_key, 0) + 1
        if item.kind == "nifti":
            suffix = ".nii.gz" if rel.endswith(".gz") else ".nii"
            dst = out_dir / item.export_id / "nifti" / f"image{s_idx:02d}{suffix}"
        else:
            dst = out_dir / item.export_id / "dicom" / f"series{s_idx:02d}"
            dst = dst / f"IM{counters[series_key]:04d}.dcm"
        if not rel:
            _error(summary, item, f"file {n} of {len(files)}", "source file not found")
            continue
        try:
            written = _copy_one(_read_source(reader, root, rel), dst, item, deid, rel,
                                allow_burned_in)  # fmt: skip
        except ExportWriteError:
            raise
        except (OSError, InvalidDicomError, DeidError, ValueError, KeyError, struct.error) as exc:
            _error(summary, item, f"file {n} of {len(files)}", _reason(exc))
            dst.unlink(missing_ok=True)
            continue
        rel_out = dst.relative_to(out_dir).as_posix()
        if not written:
            _withhold(summary, item, rel_out, item.pixel_risk[rel], source=rel)
            continue
        item.files.append(rel_out)
        item.crosswalk_files.append({"exported": rel_out, "source": rel})
    if item.kind == "nifti" and deid is not None:
        item.new_study_uid = deid.new_uid("nifti:" + item.study["study_key"])
        item.new_patient_id = deid.pseudonym("nifti:" + item.study["study_key"])


def _reason(exc: Exception) -> str:
    """An error reason without file paths (they may hold names)."""
    if isinstance(exc, FileNotFoundError):
        return "source file not found"
    if isinstance(exc, OSError):
        return f"cannot read source file ({type(exc).__name__})"
    if isinstance(exc, InvalidDicomError):
        return "source file is not valid DICOM"
    return exception_reason(exc, limit=120)


def _read_source(reader: MemberReader, root: Path, rel: str) -> bytes:
    """Bytes of a source file: a plain file, or a member of a .zip/.tar under the root."""
    if split_member(rel)[1] is None:
        return (root / rel).read_bytes()
    return reader.read(rel)


def _copy_one(
    data: bytes,
    dst: Path,
    item: StudyExport,
    deid: Deidentifier | None,
    rel: str,
    allow_burned_in: bool,
) -> bool:
    """Write one source file's bytes to ``dst``, de-identified unless ``deid`` is None.

    Returns:
        False when the file is withheld instead (de-identifying, its pixels may show burned-in
        text, and ``allow_burned_in`` is off); its risk is kept in ``item.pixel_risk[rel]``.
    """
    if item.kind == "nifti":
        _write_out(data if deid is None else deidentify_nifti_data(data, dst.name), dst)
        return True
    with quiet_pydicom():  # its warnings quote malformed values (UIDs, dates) into the logs
        ds = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=deid is None)
        risk = item.pixel_risk[rel] = burned_in_risk(ds)
        if deid is not None and risk.possible and not allow_burned_in:
            item.new_study_uid, item.new_patient_id = deid.identify(ds)
            return False
        if deid is None:
            _write_out(data, dst)
        else:
            deid.deidentify(ds)
            buf = io.BytesIO()
            ds.save_as(buf, enforce_file_format=True)
            _write_out(buf.getvalue(), dst)
        item.new_study_uid = str(ds.get("StudyInstanceUID", ""))
        item.new_patient_id = str(ds.get("PatientID", ""))
        item.study.setdefault("_study_date", str(ds.get("StudyDate", "")))
    return True


def _overlay_rows(rows: list[dict]) -> list[dict]:
    """Flagged slices of a study, or its top slice when none is flagged."""
    flagged = [r for r in rows if r["flagged"] and r["heatmap_png"]]
    if flagged:
        return flagged
    return [r for r in rows if r["heatmap_png"]][:1]


def _overlay_risk(item: StudyExport, row: dict) -> BurnedIn:
    """The burned-in risk of an overlay's source file (unknown when it was not read)."""
    return item.pixel_risk.get(row["source_file"], BurnedIn.UNKNOWN)


def _export_overlays(root, rows, out_dir, item: StudyExport, scale, options, summary) -> None:
    """Write the overlay PNGs (and the SC series) of one study; an overlay blends its source
    slice, so it is withheld with a source that may show burned-in text."""
    chosen = _overlay_rows(rows)
    series_order = list(dict.fromkeys(r["series_key"] for r in rows))
    if options.deidentify and not options.allow_burned_in:
        for r in [r for r in chosen if _overlay_risk(item, r).possible]:
            name = f"{item.export_id}/overlays/{_overlay_name(series_order, r)}"
            _withhold(summary, item, name, _overlay_risk(item, r), source=None)
        chosen = [r for r in chosen if not _overlay_risk(item, r).possible]
    bases: dict[str, dict] = {}
    sc_items: list[tuple[np.ndarray, str]] = []
    sc_risks: list[BurnedIn] = []
    for r in chosen:
        sk = r["series_key"]
        if sk not in bases:
            wanted = {
                (x["volume_index"], x["slice_index"]) for x in chosen if x["series_key"] == sk
            }
            bases[sk] = model_input_slices(root, [x for x in rows if x["series_key"] == sk], wanted)
        base = bases[sk].get((r["volume_index"], r["slice_index"]))
        s_idx = series_order.index(sk) + 1
        name = _overlay_name(series_order, r)
        if base is None:
            _error(summary, item, f"overlay {name}", "slice image unavailable; heatmap only")
            base = np.zeros((1, 1), dtype=np.float32)
        try:
            png = overlay_png(base, r["heatmap_png"], r["heatmap_max"], scale)
        except ValueError as exc:
            _error(summary, item, f"overlay {name}", _reason(exc))
            continue
        path = out_dir / item.export_id / "overlays" / name
        _write_out(png, path)
        item.overlays.append(path.relative_to(out_dir).as_posix())
        comment = f"series {s_idx} slice {r['slice_index']} score {r['score']:.4f}"
        sc_items.append((np.asarray(Image.open(io.BytesIO(png)).convert("RGB")), comment))
        sc_risks.append(_overlay_risk(item, r))
    if options.secondary_capture and sc_items:
        _write_sc(out_dir, item, sc_items, options.deidentify, inherited_flag(sc_risks))


def _overlay_name(series_order: list[str], row: dict) -> str:
    s_idx = series_order.index(row["series_key"]) + 1
    return f"series{s_idx:02d}_v{row['volume_index']}_z{row['slice_index']:04d}.png"


def _write_sc(
    out_dir: Path, item: StudyExport, sc_items, deidentified: bool, burned_in: str | None
) -> None:
    # No study UID / patient ID of its own (NIfTI kept identified, or no source file copied):
    # random ones, never ones derived from the rank alone, which every export shares.
    study_uid = item.new_study_uid or generate_uid()
    patient_id = item.new_patient_id or f"{item.export_id}-{secrets.token_hex(6).upper()}"
    study = ScStudy(
        study_uid=study_uid,
        patient_id=patient_id,
        patient_name=patient_id,
        study_date=item.study.get("_study_date", "") if item.kind == "dicom" else "",
        deidentified=deidentified,
        burned_in=burned_in,
    )
    sc_dir = ensure_private_dir(out_dir / item.export_id / "secondary_capture")
    paths = write_sc_series(sc_items, study, sc_dir, series_seed=item.export_id)
    item.secondary_capture = [p.relative_to(out_dir).as_posix() for p in paths]


def _blank(value: object) -> object:
    return "" if value is None else value


def _write_manifest_csv(out_dir: Path, summary: ExportSummary) -> None:
    fh = io.StringIO(newline="")
    writer = csv.DictWriter(fh, fieldnames=MANIFEST_COLUMNS)
    writer.writeheader()
    for s in summary.studies:
        st = s.study
        writer.writerow({
            "export_id": s.export_id, "rank": s.rank, "kind": s.kind,
            "modality": st.get("modality") or "", "decision": st["decision"],
            "reason": st.get("reason") or "", "model_id": st["model_id"],
            "max_score": f"{st['max_score']:.6g}", "topk_mean": f"{st['topk_mean']:.6g}",
            "n_flagged": st["n_flagged"], "n_assessed": _blank(st.get("n_assessed")),
            "n_out_of_distribution": _blank(st.get("n_out_of_distribution")),
            "n_slices": st["n_slices"],
            "new_study_uid": s.new_study_uid, "new_patient_id": s.new_patient_id,
            "files": ";".join(s.files), "overlays": ";".join(s.overlays),
            "secondary_capture": ";".join(s.secondary_capture),
            "withheld": ";".join(s.withheld),
            "withheld_reason": WITHHELD_REASON if s.withheld else "",
        })  # fmt: skip
    _write_out(fh.getvalue().encode("utf-8"), out_dir / "manifest.csv")


def _write_export_json(out_dir, results: RunResults, options, summary, scale) -> None:
    doc = {
        "tool": "pdd-batch export",
        "version": pdd_batch.__version__,
        "options": options.to_dict(),
        "deidentification": (
            "DICOM PS3.15 E.1 basic profile, dates shifted per patient (113107); pixels "
            "unchanged, files that may show burned-in text "
            + ("exported (--allow-burned-in)" if options.allow_burned_in else "withheld")
            + "; NIfTI header text fields blanked, extensions dropped"
            if options.deidentify else "none"
        ),
        "run": {
            "run_id": results.manifest.get("run_id"),
            "model_id": results.model_id,
            "checkpoint_hash": results.checkpoint_hash,
        },
        "overlay_colour_scale": {"transparent_at_or_below": scale[0], "red_at": scale[1]},
        "counts": {"studies": len(summary.studies), "files": summary.n_files,
                   "overlays": summary.n_overlays, "withheld": len(summary.withheld),
                   "errors": len(summary.errors)},
        "errors": summary.errors,
        "withheld": summary.withheld,
        "warnings": summary.warnings,
    }  # fmt: skip
    _write_out(json.dumps(doc, indent=2).encode("utf-8"), out_dir / "export.json")


def write_crosswalk(path: Path, summary: ExportSummary, deid: Deidentifier | None) -> None:
    """Write the new -> original identifier table as JSON with mode 0600 (owner only)."""
    by_uid = deid.crosswalk if deid is not None else {}
    studies = []
    for s in summary.studies:
        entry = {"export_id": s.export_id, "study_key": s.study["study_key"],
                 "new_study_uid": s.new_study_uid, "new_patient_id": s.new_patient_id,
                 "files": s.crosswalk_files, "withheld": s.crosswalk_withheld}  # fmt: skip
        entry.update({k: v for k, v in by_uid.get(s.new_study_uid, {}).items() if k not in entry})
        studies.append(entry)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        os.fchmod(fh.fileno(), 0o600)
        json.dump({"studies": studies}, fh, indent=2)
