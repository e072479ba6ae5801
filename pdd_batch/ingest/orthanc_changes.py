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
from pathlib import Path
from typing import Any

from pdd_batch.ingest.dicomweb import Query, QueryResult, query_series, recorded_cursor
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


def change_cursor(endpoint: Endpoint) -> int | None:
    """The change log's current ``Last`` sequence number, or ``None`` when the server is not
    an Orthanc (or its REST API is not beside the DICOMweb root)."""
    rest = rest_endpoint(endpoint)
    if rest is None:
        return None
    with new_session(rest) as session:
        try:
            system = _json(session, rest, "/system")
            if not isinstance(system, dict) or "ApiVersion" not in system:
                return None
            last = _json(session, rest, "/changes", last="")
        except DicomwebError as exc:  # no REST API there: the StudyDate window only
            log.info("no Orthanc change log beside the DICOMweb root (%s)", exc)
            return None
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
        for _ in range(MAX_CHANGE_PAGES):
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


def with_received_studies(
    endpoint: Endpoint, query: Query, found: QueryResult, out_dir: Path, cursor: int | None
) -> QueryResult:
    """``found`` (a ``--since last-run`` query) plus the series of the studies Orthanc received
    since the previous complete run of ``out_dir`` (whatever their StudyDate), de-duplicated
    by series; ``cursor`` (read before the query) is carried on to be recorded.

    Raises:
        DicomwebError: the change log or the added studies cannot be queried.
    """
    found = replace(found, cursor=cursor)
    before = recorded_cursor(out_dir)
    if before is None or cursor is None:
        return found
    uids = studies_received(endpoint, before, cursor)
    if query.study_uids:
        uids = tuple(u for u in uids if u in set(query.study_uids))
    if not uids:
        return found
    extra = query_series(endpoint, Query(modality=query.modality, study_uids=uids))
    hits = {h.key: h for h in found.hits}
    for hit in extra.hits:
        hits.setdefault(hit.key, hit)
    dates = [d for d in (found.earliest_study_date, extra.earliest_study_date) if d]
    log.info("Orthanc change log: %d studies received since the last run", len(uids))
    return replace(
        found,
        hits=sorted(hits.values(), key=lambda h: h.key),
        own_skipped=found.own_skipped + extra.own_skipped,
        earliest_study_date=min(dates, default=None),
    )
