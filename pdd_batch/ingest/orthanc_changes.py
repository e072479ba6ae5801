"""A received-time cursor for an Orthanc PACS: its change log (``/changes``, ``StableStudy``
events) names the studies that reached the server since the previous run, whatever their
StudyDate (a prior, an import, a late send), so ``--since last-run`` also screens them.

Orthanc's REST API sits beside its DICOMweb root (``http://HOST:8042`` for
``http://HOST:8042/dicom-web``); any other server answers ``/system`` differently and keeps the
StudyDate window only. The cursor is the log's ``Last`` sequence number, read *before* the query
and recorded with it (``RUN/_pacs/query.json``), so no study received meanwhile is missed.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from typing import Any

from pdd_batch.ingest.dicomweb_http import DicomwebError, Endpoint, get, new_session

log = logging.getLogger(__name__)

DICOMWEB_SUFFIX = "/dicom-web"
CHANGES_PAGE = 1000
MAX_CHANGE_PAGES = 10_000
STABLE_STUDY = "StableStudy"


def rest_endpoint(endpoint: Endpoint) -> Endpoint | None:
    """Orthanc's REST root beside a ``.../dicom-web`` DICOMweb root (``None`` otherwise)."""
    if not endpoint.url.rstrip("/").endswith(DICOMWEB_SUFFIX):
        return None
    return replace(endpoint, url=endpoint.url.rstrip("/")[: -len(DICOMWEB_SUFFIX)])


def _json(session: Any, rest: Endpoint, path: str, **params: Any) -> Any:
    response = get(session, rest, path, what="Orthanc change log", params=params or None)
    try:
        return response.json()
    except ValueError:
        return None


def is_orthanc(endpoint: Endpoint) -> bool:
    """Whether an Orthanc REST API answers beside the DICOMweb root (``GET /system`` with an
    ``ApiVersion``: one read-only request)."""
    rest = rest_endpoint(endpoint)
    if rest is None:
        return False
    rest = replace(rest, max_attempts=1, timeout_s=min(rest.timeout_s, 15.0))
    with new_session(rest) as session:
        try:
            system = _json(session, rest, "/system")
        except DicomwebError as exc:  # no REST API there
            log.info("no Orthanc REST API beside the DICOMweb root (%s)", exc)
            return False
    return isinstance(system, dict) and "ApiVersion" in system


def change_cursor(endpoint: Endpoint) -> int | None:
    """The change log's current ``Last`` sequence number (``None`` when the answer has none).

    Raises:
        DicomwebError: the change log cannot be read (the server is not an Orthanc, see
            ``is_orthanc``).
    """
    rest = rest_endpoint(endpoint)
    if rest is None:
        raise DicomwebError("Orthanc change log: the DICOMweb root does not end in /dicom-web")
    with new_session(rest) as session:
        last = _json(session, rest, "/changes", last="")
    value = last.get("Last") if isinstance(last, dict) else None
    return int(value) if isinstance(value, int) else None


def studies_received(endpoint: Endpoint, since: int, upto: int) -> tuple[str, ...]:
    """StudyInstanceUIDs of the ``StableStudy`` changes with ``since < Seq <= upto``.

    Raises:
        DicomwebError: the change log cannot be read (a study that has since been deleted is
            left out).
    """
    rest = rest_endpoint(endpoint)
    if rest is None or upto <= since:
        return ()
    ids: list[str] = []
    with new_session(rest) as session:
        cursor = since
        for _ in range(MAX_CHANGE_PAGES):  # paged: a long log is never cut short silently
            page = _json(session, rest, "/changes", since=cursor, limit=CHANGES_PAGE)
            if not isinstance(page, dict):
                raise DicomwebError("Orthanc change log: not a JSON object")
            for change in page.get("Changes") or []:
                seq = change.get("Seq", 0)
                if change.get("ChangeType") == STABLE_STUDY and cursor < seq <= upto:
                    ids.append(str(change.get("ID", "")))
            last = page.get("Last")
            if page.get("Done") or not isinstance(last, int) or last <= cursor or last >= upto:
                break
            cursor = last
        else:
            raise DicomwebError(f"Orthanc change log: more than {MAX_CHANGE_PAGES} pages")
        uids = [_study_uid(session, rest, orthanc_id) for orthanc_id in dict.fromkeys(ids)]
    return tuple(u for u in uids if u)


def _study_uid(session: Any, rest: Endpoint, orthanc_id: str) -> str | None:
    """A study's UID from its Orthanc id (``None`` when it has been deleted since)."""
    try:
        study = _json(session, rest, f"/studies/{orthanc_id}")
    except DicomwebError as exc:
        if "HTTP 404" in str(exc):
            return None
        raise
    tags = study.get("MainDicomTags", {}) if isinstance(study, dict) else {}
    return tags.get("StudyInstanceUID") or None
