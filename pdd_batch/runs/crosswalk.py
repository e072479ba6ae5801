"""The screening crosswalk (``pdd-batch screen --crosswalk FILE``): keys back to files and UIDs.

Run folders name files, series and studies only by keyed digests (``pdd_batch.keys``). A site that
must find the file behind a flagged slice asks for a crosswalk: one JSON file, mode 0600, outside
the run folder, holding for every discovered file its ``file_key``, archive-relative ``path``,
``series_key``/``study_key`` and, for DICOM files, the original Study/Series/SOP Instance UIDs.
It re-identifies, so it is opt-in, opened with ``O_NOFOLLOW`` (a planted link is refused) and
never written inside the run folder.
"""

from __future__ import annotations

import io
import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pdd_batch.ingest.archive_io import MemberReader, split_member
from pdd_batch.ingest.discovery import Discovery
from pdd_batch.ingest.keys import file_key

log = logging.getLogger(__name__)

CROSSWALK_VERSION = 1
UID_TAGS = ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID")


class CrosswalkError(ValueError):
    """A crosswalk that cannot be written or read (the message says why)."""


def check_location(path: Path, out_dir: Path) -> None:
    """Refuse a crosswalk inside the run folder (whose outputs must stay identifier-free)."""
    cw, out = Path(path).expanduser().absolute(), Path(out_dir).expanduser().absolute()
    if cw == out or out in cw.parents:
        raise CrosswalkError("--crosswalk must be outside the run folder (it holds paths and UIDs)")


def _uids(reader: MemberReader, root: Path, rel: str) -> dict[str, str]:
    """Original UIDs of a DICOM file ({} when it has none or cannot be read)."""
    import pydicom

    from pdd_batch.ingest.dicom_headers import quiet_pydicom

    try:
        if split_member(rel)[1] is None:
            fh: Any = open(root / rel, "rb")  # noqa: SIM115 - closed below
        else:
            fh = io.BytesIO(reader.read(rel))
        with fh, quiet_pydicom():
            ds = pydicom.dcmread(fh, stop_before_pixels=True, specific_tags=list(UID_TAGS))
    except Exception:  # noqa: BLE001 - a crosswalk entry without UIDs, never a failed run
        return {}
    return {tag: str(ds.get(tag, "")) for tag in UID_TAGS if ds.get(tag)}


def crosswalk_rows(disc: Discovery) -> list[dict[str, Any]]:
    """One entry per discovered file: keys, relative path, status and original UIDs."""
    owner: dict[str, tuple[str, str, str]] = {}
    for ref in disc.series:
        for rel in ref.files:
            owner.setdefault(rel, (ref.series_key, ref.study_key, ref.kind))
    rows = []
    with MemberReader(disc.root) as reader:
        for rec in disc.files:
            series, study, kind = owner.get(rec.path, (rec.series_key, None, None))
            row: dict[str, Any] = {
                "file_key": file_key(rec.path),
                "path": rec.path,
                "status": rec.status,
                "series_key": series,
                "study_key": study,
            }
            if kind != "nifti":  # failed and skipped DICOM files too: a site must find them
                row.update(_uids(reader, disc.root, rec.path))
            rows.append(row)
    return rows


def write_crosswalk(path: Path, disc: Discovery, key_id: str) -> Path:
    """Write the crosswalk of a discovery to ``path`` (JSON, mode 0600, links refused).

    Raises:
        CrosswalkError: ``path`` is a symbolic link or cannot be written.
    """
    path = Path(path).expanduser()
    doc = {
        "crosswalk_version": CROSSWALK_VERSION,
        "key_id": key_id,
        "archive_root": str(Path(disc.root).resolve()),
        "files": crosswalk_rows(disc),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW
    try:
        fd = os.open(path, flags, 0o600)
    except OSError as exc:
        why = "is a symbolic link" if path.is_symlink() else exc.strerror
        raise CrosswalkError(f"cannot write the crosswalk {path.name}: {why}") from exc
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        os.fchmod(fh.fileno(), 0o600)  # an existing file keeps its mode through O_CREAT
        json.dump(doc, fh, indent=1)
    log.info("crosswalk written (%d files)", len(doc["files"]))
    return path


def read_crosswalk(path: Path) -> dict[str, Any]:
    """A crosswalk written by ``write_crosswalk`` (``files`` as a list of entries).

    Raises:
        CrosswalkError: missing, unreadable, or not a crosswalk.
    """
    path = Path(path).expanduser()
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
        with os.fdopen(fd, "r", encoding="utf-8") as fh:
            doc = json.load(fh)
    except (OSError, ValueError) as exc:
        raise CrosswalkError(f"cannot read the crosswalk {path.name}: {exc}") from exc
    if not isinstance(doc, dict) or doc.get("crosswalk_version") != CROSSWALK_VERSION:
        raise CrosswalkError(f"{path.name} is not a pdd-batch screening crosswalk")
    return doc


def paths_by_key(doc: Mapping[str, Any]) -> dict[str, str]:
    """``{file_key: relative path}`` of a crosswalk document."""
    return {str(f["file_key"]): str(f["path"]) for f in doc.get("files", [])}
