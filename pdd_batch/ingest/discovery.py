"""Archive discovery: every file accounted for, image files grouped Study -> Series.

DICOM headers are read with ``stop_before_pixels``; NIfTI files are one series each (header only).
Every file seen gets a ``FileRecord``: ``used`` (part of a series), ``skipped`` (not an image to
screen: SR/KOS/PR/SEG/PDF/DICOMDIR, unsupported modality, junk such as README/.json, scouts,
duplicates) or ``failed`` (should be an image but cannot be read: corrupt, truncated, empty).

Paths are posix, relative to the archive root; members of .zip/.tar archives (``open_archives``)
are ``"archive.zip!inner/path.dcm"`` (see ``archive_io``); an opened archive is not itself a
record, its members are (one that cannot be opened is a ``failed`` record). Studies and series are
named by hashed keys (``keys``); raw UIDs never leave discovery (header facts travel only from
a shard task to the driver that merges them).

One file's header is read by ``header_read.read_file``, a pure function that returns plain
records (``FileResult``), so Ray tasks can read headers too (``jobs.discovery_shards``); the
``Collector`` merges them in the walk's order and groups them into series here.

Hostile input never stops discovery: any error of one file (or member) becomes that file's
``failed`` record with a path-free reason; ``IngestLimits`` refuse headers and members that
would make the driver or a worker allocate too much; a link that resolves outside the archive
root is ``skipped`` unless ``follow_links_outside``.
"""

from __future__ import annotations

import json
import logging
import os
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path, PurePosixPath
from typing import Any

from pdd_batch.ingest.anatomy import body_part_of
from pdd_batch.ingest.archive_io import IngestLimits, OverLimitError
from pdd_batch.ingest.dicom_headers import DicomHeader, FrameInfo, transfer_syntax_name
from pdd_batch.ingest.header_read import (  # noqa: F401 - DICOM_SUFFIXES re-exported
    DICOM_SUFFIXES,
    HEADER,
    NIFTI,
    FileResult,
    ReadSpec,
    folder_of,
    read_file,
)
from pdd_batch.ingest.keys import file_key, hash_key, redact_paths, series_key, study_key
from pdd_batch.ingest.series import Discovery, FileRecord, SeriesRef
from pdd_batch.ingest.stack_plan import DUPLICATE_POSITION, StackPlan, plan_stacks

log = logging.getLogger(__name__)
PROGRESS_EVERY = 1000
OUTSIDE_REASON = "link to a place outside the archive, not followed (--follow-links-outside)"


class DiscoveryError(OSError):
    """The archive root itself cannot be read."""


@dataclass
class _Collector:
    root: Path
    limits: IngestLimits = field(default_factory=IngestLimits)
    follow_links_outside: bool = False
    records: dict[str, FileRecord] = field(default_factory=dict)
    dicom: dict[tuple[str, str], list[DicomHeader]] = field(
        default_factory=lambda: defaultdict(list)
    )
    nifti: list[tuple[str, Any]] = field(default_factory=list)
    retry: set[str] = field(default_factory=set)  # failed by the reading machinery

    def record(self, rel: str, status: str, reason: str = "", key: str | None = None) -> None:
        self.records[rel] = FileRecord(rel, status, reason, key)

    def add(self, results: Iterable[FileResult]) -> None:
        """Merge what ``header_read.read_file`` found (here or in a Ray task), in order."""
        for r in results:
            if r.status == HEADER and r.header is not None:
                parent = folder_of(r.rel)
                study = r.header.study_uid or f"folder:{parent}"
                self.dicom[(study, r.header.series_uid or f"folder:{parent}")].append(r.header)
            elif r.status == NIFTI and r.nifti is not None:
                self.nifti.append((r.rel, r.nifti))
            else:
                self.record(r.rel, r.status, r.reason)
                if r.retry:
                    self.retry.add(r.rel)


def _walk(root: Path, col: _Collector) -> Iterator[Path]:
    """Files under root, in a stable (sorted) order; unreadable folders are recorded as failed.

    Links to folders inside the root are followed; links (to folders or files) that resolve
    outside it are recorded as skipped unless ``col.follow_links_outside`` (archives on shared
    storage are often assembled from links). A folder reached a second time (a link loop or two
    links to one folder) is recorded as skipped instead of being read twice.
    """
    real_root = root.resolve()

    def on_error(exc: OSError) -> None:
        where = Path(exc.filename).relative_to(root).as_posix() if exc.filename else "."
        col.record(where + "/", "failed", f"cannot list folder ({type(exc).__name__})")

    seen = {_folder_id(root)}  # folders read or queued to be read
    for dirpath, dirnames, filenames in os.walk(root, onerror=on_error, followlinks=True):
        kept = []
        for name in sorted(dirnames):
            sub = Path(dirpath) / name
            if _outside(sub, real_root, col):
                col.record(sub.relative_to(root).as_posix() + "/", "skipped", OUTSIDE_REASON)
                continue
            try:
                fid = _folder_id(sub)
            except OSError:
                kept.append(name)  # os.walk reports it through on_error
                continue
            if fid in seen:
                rel = sub.relative_to(root).as_posix()
                col.record(rel + "/", "skipped", "folder already read through another path (link)")
                continue
            seen.add(fid)
            kept.append(name)
        dirnames[:] = kept
        for name in sorted(filenames):
            path = Path(dirpath) / name
            if _outside(path, real_root, col):
                col.record(path.relative_to(root).as_posix(), "skipped", OUTSIDE_REASON)
                continue
            yield path


def _outside(path: Path, real_root: Path, col: _Collector) -> bool:
    """True when ``path`` is a link that resolves outside the archive root.

    Only links are resolved (one ``lstat`` per entry otherwise): ``_walk`` never enters a folder
    outside the root, so a plain entry of a folder it reads is inside.
    """
    if col.follow_links_outside or not path.is_symlink():
        return False
    try:
        return not path.resolve().is_relative_to(real_root)
    except (OSError, RuntimeError):  # a link loop resolves to nothing: refuse it
        return True


def _folder_id(path: Path) -> tuple[int, int]:
    st = path.stat()  # follows links
    return st.st_dev, st.st_ino


def _dicom_series(
    col: _Collector, group: tuple[str, str], headers: list[DicomHeader]
) -> list[SeriesRef]:
    """SeriesRefs of one (study, series) group; records every file's fate.

    A stack over ``max_series_voxels`` is not a series: its files are failed records. Files
    whose headers passed the pixel checks of ``read_header`` are the only ones here, so a copy
    of an instance kept below is always a readable one (damaged copies are failed records).
    """
    n_seen = len(headers)
    headers, copies_of = _one_per_instance(col, headers)
    n_copies = n_seen - len(headers)
    copy_note = (f"{n_copies} duplicate instance(s) excluded",) if n_copies else ()
    frames: list[FrameInfo] = [f for h in headers for f in h.frames]
    stacks, scouts = plan_stacks(frames)
    by_file = {h.file: h for h in headers}
    modality = Counter(h.modality for h in headers).most_common(1)[0][0]
    facts = {k: _most_common(getattr(h, k) for h in headers) for k in ("body_part", "view")}
    ages = Counter(h.age_years for h in headers if h.age_years is not None)
    age = ages.most_common(1)[0][0] if ages else None  # in memory only (``SeriesRef``)
    refs = []
    used: set[str] = set()
    too_big: dict[str, str] = {}
    for part, plan in enumerate(stacks):
        key = series_key(group[0], group[1], part)
        files = _files_in_order(plan)
        try:
            col.limits.check_voxels("series", plan.n_slices * plan.shape[1] * plan.shape[2])
        except OverLimitError as exc:
            too_big.update((rel, str(exc)) for rel in files)
            continue
        for rel in files:
            if rel not in used:
                col.record(rel, "used", "", key)
                used.add(rel)
        spares = _spares(plan, files, copies_of)
        syntaxes = sorted({transfer_syntax_name(by_file[r].transfer_syntax) for r in files})
        ref = _ref_from_plan(plan, key, study_key(group[0]), modality, files, syntaxes)
        warnings = (*ref.warnings, *copy_note)
        refs.append(replace(ref, **facts, warnings=warnings, spares=spares, age_years=age))
    for frame, reason in [*scouts, *(e for plan in stacks for e in plan.excluded)]:
        if frame.file not in used:
            col.record(frame.file, "skipped", reason)
    for rel, reason in too_big.items():
        if rel not in used:
            col.record(rel, "failed", reason)
    return refs


SAME_INSTANCE_REASON = "duplicate instance (another file with the same SOP Instance UID kept)"


def _one_per_instance(
    col: _Collector, headers: list[DicomHeader]
) -> tuple[list[DicomHeader], dict[str, str]]:
    """One file per SOP Instance UID (the first by path); the other copies are skipped.

    Returns:
        The kept headers, and each copy left out -> the file kept in its place.
    """
    kept: dict[str, DicomHeader] = {}
    out = []
    copies_of: dict[str, str] = {}
    for h in sorted(headers, key=lambda h: h.file):
        if h.sop_uid and h.sop_uid in kept:
            col.record(h.file, "skipped", SAME_INSTANCE_REASON)
            copies_of[h.file] = kept[h.sop_uid].file
            continue
        kept.setdefault(h.sop_uid, h)
        out.append(h)
    return out, copies_of


def _spares(plan: StackPlan, files: tuple[str, ...], copies_of: dict[str, str]) -> tuple[str, ...]:
    """Files of a stack left out as copies (same SOP Instance UID as a file of the stack, or a
    duplicate slice position in it), for the read stage to fall back to (``SeriesRef.spares``)."""
    in_stack = set(files)
    found = {f.file: None for f, reason in plan.excluded if reason == DUPLICATE_POSITION}
    found.update((copy, None) for copy, kept in copies_of.items() if kept in in_stack)
    return tuple(sorted(f for f in found if f not in in_stack))


def _most_common(values: Iterable[str]) -> str:
    """The most frequent non-empty value ("" when there is none)."""
    counts = Counter(v for v in values if v)
    return counts.most_common(1)[0][0] if counts else ""


def _files_in_order(plan: StackPlan) -> tuple[str, ...]:
    seen: dict[str, None] = {}
    for volume in plan.volumes:
        for f in volume:
            seen.setdefault(f.file, None)
    return tuple(seen)


def _ref_from_plan(
    plan: StackPlan, key: str, skey: str, modality: str, files: tuple[str, ...], syntaxes: list[str]
) -> SeriesRef:
    return SeriesRef(
        series_key=key,
        study_key=skey,
        kind="dicom",
        modality=modality,
        files=files,
        n_slices=plan.n_slices,
        n_volumes=len(plan.volumes),
        shape=plan.shape,
        spacing=tuple(round(s, 4) for s in plan.spacing),
        orientation=plan.orientation,
        transfer_syntaxes=tuple(syntaxes),
        warnings=plan.warnings,
        n_gaps=plan.n_gaps,
        tilt_deg=round(plan.tilt_deg, 2),
    )


SIDECAR_MAX_BYTES = 1024**2  # a BIDS/dcm2niix sidecar is a few KiB; never read a huge file


def _sidecar_facts(root: Path, rel: str, seen: dict[str, FileRecord]) -> tuple[str, str]:
    """(modality, body part) from a BIDS/dcm2niix sidecar (same name, .json) next to a plain
    NIfTI file; ("OT", "") without one."""
    stem = rel[: -len(".nii.gz")] if rel.lower().endswith(".nii.gz") else rel[: -len(".nii")]
    sidecar = stem + ".json"
    if sidecar not in seen or "!" in sidecar or seen[sidecar].reason == OUTSIDE_REASON:
        return "OT", ""
    try:
        if (root / sidecar).stat().st_size > SIDECAR_MAX_BYTES:
            return "OT", ""
        meta = json.loads((root / sidecar).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return "OT", ""
    if not isinstance(meta, dict):
        return "OT", ""
    modality = meta.get("Modality")
    texts = [str(meta.get(k) or "") for k in ("SeriesDescription", "ProtocolName")]
    body_part = body_part_of(str(meta.get("BodyPartExamined") or ""), texts)
    return (str(modality).upper() if isinstance(modality, str) and modality else "OT"), body_part


def _nifti_series(col: _Collector, rel: str, info: Any) -> SeriesRef:
    key = hash_key("nifti-series", rel)
    col.record(rel, "used", "", key)
    x, y, z = info.shape
    warnings = []
    if info.n_volumes > 1:
        warnings.append(f"4D NIfTI: {info.n_volumes} volumes of {z} slices")
    modality, body_part = _sidecar_facts(col.root, rel, col.records)
    return SeriesRef(
        series_key=key,
        study_key=hash_key("nifti-study", str(PurePosixPath(rel.split("!")[0]).parent)),
        kind="nifti",
        modality=modality,
        body_part=body_part,
        files=(rel,),
        n_slices=z * info.n_volumes,
        n_volumes=info.n_volumes,
        shape=(z, y, x),
        spacing=tuple(round(float(v), 4) for v in (info.zooms[2], info.zooms[1], info.zooms[0])),
        orientation=f"axial (stored {info.orientation})",
        transfer_syntaxes=(f"NIfTI {info.dtype}",),
        warnings=tuple(warnings),
    )


def discover(
    archive: Path,
    *,
    open_archives: bool = False,
    progress: Callable[[int], None] | None = None,
    limits: IngestLimits | None = None,
    follow_links_outside: bool = False,
) -> Discovery:
    """Find every series in a folder tree (or a single file / archive file).

    Args:
        archive: a folder (the archive root), or one file (then its folder is the root).
        open_archives: look inside .zip/.tar files; otherwise they are skipped with a reason.
        progress: called with the number of files seen so far, every ``PROGRESS_EVERY`` files.
        limits: caps on frames, voxels and archive members (default ``IngestLimits()``).
        follow_links_outside: read links that resolve outside the archive root (refused and
            recorded as skipped by default).

    Raises:
        DiscoveryError: the archive path does not exist.
    """
    archive = Path(archive)
    if not archive.exists():
        raise DiscoveryError(f"archive not found: {archive.name}")
    root = archive if archive.is_dir() else archive.parent
    col = _Collector(root, limits or IngestLimits(), follow_links_outside)
    spec = ReadSpec(root, open_archives, col.limits)
    paths = _walk(root, col) if archive.is_dir() else iter([archive])
    for n, path in enumerate(paths, 1):
        if progress is not None and n % PROGRESS_EVERY == 0:
            progress(n)
        col.add(read_file(spec, path, path.relative_to(root).as_posix()))
    return group_collected(col)


def group_collected(col: _Collector) -> Discovery:
    """Group the headers ``col`` collected into series (every file's record set)."""
    root = col.root
    series: list[SeriesRef] = []
    for group, headers in col.dicom.items():
        files = tuple(h.file for h in headers)
        series.extend(_grouped(col, partial(_dicom_series, col, group, headers), files))
    for rel, info in col.nifti:
        series.extend(_grouped(col, partial(_nifti_series, col, rel, info), (rel,)))
    result = Discovery(root=root, series=series, files=list(col.records.values()))
    log.info("discovery: %s, %d series", result.counts(), len(series))
    return result


def _grouped(
    col: _Collector, build: Callable[[], list[SeriesRef] | SeriesRef], files: tuple[str, ...]
) -> list[SeriesRef]:
    """``build()`` as a list; if it fails, ``files`` are failed records (the run goes on)."""
    try:
        refs = build()
    except Exception as exc:  # noqa: BLE001 - one bad group never stops discovery
        reason = f"cannot group this series ({type(exc).__name__})"
        for rel in files:
            col.record(rel, "failed", reason)
        log.warning("discovery: a series could not be grouped (%s)", type(exc).__name__)
        return []
    return refs if isinstance(refs, list) else [refs]


# For the incremental layer (``pdd_batch.ingest.file_index``), which wraps this module.
Collector = _Collector
walk_files = _walk


def error_row(rec: FileRecord, show_paths: bool = False) -> dict[str, str]:
    """A skipped or failed file for people: its key, status and reason (any path in it
    redacted); its relative path only when ``show_paths`` (folder names are often patient
    names)."""
    row = {"file_key": file_key(rec.path), "status": rec.status, "reason": rec.reason}
    if show_paths:
        row["file"] = rec.path
    else:
        row["reason"] = redact_paths(rec.reason, (rec.path,))
    return row


def discovery_report(result: Discovery, show_paths: bool = False) -> dict[str, Any]:
    """The JSON object printed by ``pdd-batch inspect --json``: no identifiers; files named by
    key (their relative paths too with ``show_paths``).

    ``n_slices`` of a series counts every slice of every volume (a 4D series of 10 volumes of
    15 slices has 150); ``n_volumes`` and ``shape`` (slices per volume, rows, cols) give the split.
    """
    series = []
    for ref in result.series:
        row = ref.to_dict()
        row["n_files"] = len(row.pop("files"))
        row.pop("spares")  # paths (folder names can be patient names)
        series.append(row)
    return {
        "files": result.counts(),
        "n_studies": len({ref.study_key for ref in result.series}),
        "series": series,
        "errors": [error_row(r, show_paths) for r in result.errors()],
        "n_slices_convention": "all slices of all volumes (4D: slices per volume x volumes)",
    }
