"""``--since last-run`` on any PACS: which kind of server it is, what cursor on what the
server *received* it keeps, and the overlapping StudyDate window everywhere.

A StudyDate window alone misses a study acquired earlier and sent today (a prior, an import,
a late send), so a nightly run adds the studies the server received since the previous
complete run where the server can say so:

- **orthanc**: its change log (``/changes``, ``StableStudy``; ``pdd_batch.ingest.orthanc_changes``);
- **dcm4chee**: dcm4chee-arc's QIDO-RS query key ``StudyReceiveDateTime`` (its private attribute
  (7777,1020) of creator ``DCM4CHEE Archive 5``, a date-time range on study level): studies
  received since the previous complete run's query, minus ``RECEIVE_OVERLAP``;
- **generic** (any other server): no cursor; the StudyDate window reaches back
  ``--lookback-days`` (``DEFAULT_LOOKBACK_DAYS``) before the previous query, and a study dated
  earlier and sent late is missed.

Studies named by a cursor and found by the window are queried and fetched once.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from datetime import datetime, timedelta, timezone
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from pdd_batch.ingest.dicomweb import (
    TAG_STUDY_UID,
    DicomwebError,
    Endpoint,
    Query,
    QueryResult,
    last_query_time,
    paged,
    qido_search,
    query_series,
    recorded_cursor,
)
from pdd_batch.ingest.dicomweb_http import get, new_session
from pdd_batch.ingest.orthanc_changes import is_orthanc, studies_received

log = logging.getLogger(__name__)

AUTO, ORTHANC, DCM4CHEE, GENERIC = "auto", "orthanc", "dcm4chee", "generic"
PACS_KINDS = (AUTO, ORTHANC, DCM4CHEE, GENERIC)
CURSOR_ORTHANC = "orthanc-changes"
CURSOR_DCM4CHEE = "dcm4chee-receive-time"
CURSOR_WINDOW = "studydate-window"  # no received-time cursor: the StudyDate window only
CURSOR_NONE = "none"  # --since DATE, --all or a UID list: no nightly cursor at all
DEFAULT_LOOKBACK_DAYS = 7  # generic servers (and a first cursor run after one)
CURSOR_LOOKBACK_DAYS = 1  # with a received-time cursor: study dates are a modality's local day
# dcm4chee reads a date-time without offset in its own time zone (UTC-12 .. UTC+14): sent in
# UTC, 24 h earlier, the range starts before the previous query wherever the archive is, and
# covers clock skew and studies still arriving while that query ran.
RECEIVE_OVERLAP = timedelta(hours=24)
DCM4CHEE_APP = "/dcm4chee-arc"
RECEIVE_KEY = "StudyReceiveDateTime"


def dcm4chee_app(endpoint: Endpoint) -> Endpoint | None:
    """dcm4chee-arc's application root (``https://HOST:8443/dcm4chee-arc``) when the DICOMweb
    root has its shape (``.../dcm4chee-arc/aets/AET/rs``), else ``None``."""
    parts = urlsplit(endpoint.url)
    head, found, tail = parts.path.partition(DCM4CHEE_APP + "/aets/")
    if not found or not tail:
        return None
    app = urlunsplit((parts.scheme, parts.netloc, head + DCM4CHEE_APP, "", ""))
    return replace(endpoint, url=app, max_attempts=1, timeout_s=min(endpoint.timeout_s, 15.0))


def is_dcm4chee(endpoint: Endpoint) -> bool:
    """Whether the server is a dcm4chee-arc: its documented read-only ``GET
    /dcm4chee-arc/devicename`` answers a JSON object with ``dicomDeviceName`` (one request, no
    side effect; only for a root of dcm4chee-arc's shape, see ``dcm4chee_app``)."""
    app = dcm4chee_app(endpoint)
    if app is None:
        return False
    with new_session(app) as session:
        try:
            response = get(
                session, app, "/devicename", what="dcm4chee-arc probe", accept="application/json"
            )
            answer = response.json()
        except (DicomwebError, ValueError) as exc:
            log.info("no dcm4chee-arc device name beside the DICOMweb root (%s)", exc)
            return False
    return isinstance(answer, dict) and isinstance(answer.get("dicomDeviceName"), str)


def resolve_kind(endpoint: Endpoint, requested: str) -> tuple[str, str]:
    """(server kind, how it was decided: ``option`` or ``probe``) for ``--pacs-kind``.

    ``auto`` probes, cheaply and without side effects: Orthanc's ``/system`` beside a
    ``.../dicom-web`` root, then dcm4chee-arc's ``/devicename`` beside a
    ``.../dcm4chee-arc/aets/AET/rs`` root; anything else is ``generic``.

    Raises:
        DicomwebError: an unknown kind, or ``orthanc`` where no Orthanc REST API answers.
    """
    if requested not in PACS_KINDS:
        raise DicomwebError(f"--pacs-kind wants one of {', '.join(PACS_KINDS)}")
    if requested == ORTHANC and not is_orthanc(endpoint):
        raise DicomwebError(
            "--pacs-kind orthanc: no Orthanc REST API beside the DICOMweb root "
            "(its root must end in /dicom-web)"
        )
    if requested != AUTO:
        return requested, "option"
    if is_orthanc(endpoint):
        return ORTHANC, "probe"
    return (DCM4CHEE if is_dcm4chee(endpoint) else GENERIC), "probe"


def cursor_kind(kind: str, out_dir: Any) -> str:
    """The received-time cursor a ``--since last-run`` of ``kind`` can use with what the
    previous complete run of ``out_dir`` recorded (the StudyDate window alone if none)."""
    if kind == ORTHANC and recorded_cursor(out_dir) is not None:
        return CURSOR_ORTHANC
    if kind == DCM4CHEE and last_query_time(out_dir) is not None:
        return CURSOR_DCM4CHEE
    return CURSOR_WINDOW


def lookback_days(cursor: str, option: int | None) -> int:
    """Days of StudyDate before the previous query that ``--since last-run`` asks for again:
    ``--lookback-days``, else 1 with a received-time cursor, else ``DEFAULT_LOOKBACK_DAYS``."""
    if option is not None:
        return option
    return (
        CURSOR_LOOKBACK_DAYS
        if cursor in (CURSOR_ORTHANC, CURSOR_DCM4CHEE)
        else (DEFAULT_LOOKBACK_DAYS)
    )


def receive_time_filter(cursor_utc: datetime, overlap: timedelta = RECEIVE_OVERLAP) -> dict:
    """The dcm4chee-arc QIDO-RS match key for studies received since ``cursor_utc`` minus
    ``overlap``: ``{"StudyReceiveDateTime": "YYYYMMDDHHMMSS-"}`` (an open range, UTC digits
    without offset; see ``RECEIVE_OVERLAP``)."""
    start = cursor_utc.astimezone(timezone.utc) - overlap
    return {RECEIVE_KEY: start.strftime("%Y%m%d%H%M%S") + "-"}


def studies_received_dcm4chee(endpoint: Endpoint, cursor_utc: datetime) -> tuple[str, ...]:
    """StudyInstanceUIDs dcm4chee-arc received since ``cursor_utc`` (minus the overlap): one
    paged QIDO-RS study search (``paged``).

    Raises:
        DicomwebError: the server refused or could not answer the query.
    """
    filters = receive_time_filter(cursor_utc)
    uids: dict[str, None] = {}
    with new_session(endpoint) as session:
        search = qido_search(session, endpoint, "/studies", filters, fields=(TAG_STUDY_UID,))
        for item in paged(search):
            uid = (item.get(TAG_STUDY_UID, {}).get("Value") or [""])[0]
            if uid:
                uids[str(uid)] = None
    return tuple(uids)


@dataclass(frozen=True)
class Harvest:
    """How a run chose its studies: the server kind, the cursor used and what each part found
    (counts only: no UID, no date)."""

    server_kind: str
    kind_from: str  # "option" or "probe"
    cursor: str
    lookback_days: int | None = None  # the StudyDate window of --since last-run
    studies_window: int = 0  # studies the StudyDate (or --since/--all) query found
    studies_cursor: int = 0  # studies the received-time cursor named
    studies_both: int = 0  # of those, found by the window too (queried and fetched once)

    def limits(self) -> str:
        """What this cursor cannot see, in words (the manifest and the summary say it)."""
        days = f"{self.lookback_days} day" + ("" if self.lookback_days == 1 else "s")
        window = f"StudyDate from {days} before the previous complete run's query"
        if self.cursor == CURSOR_ORTHANC:
            return f"{window}, plus the studies Orthanc logged as StableStudy since that run"
        if self.cursor == CURSOR_DCM4CHEE:
            hours = int(RECEIVE_OVERLAP.total_seconds() // 3600)
            return (
                f"{window}, plus the studies dcm4chee-arc received (StudyReceiveDateTime) since "
                f"{hours} h before it; series added later to a study received earlier are "
                "found only by the window"
            )
        if self.cursor == CURSOR_WINDOW:
            return (
                f"{window} only: a study dated earlier and sent late is missed "
                "(screen it with --study-uid-file or --since DATE)"
            )
        return "no nightly cursor (--since DATE, --all or a study UID list)"

    def to_dict(self) -> dict[str, Any]:
        """The manifest's ``pacs`` section (and the query record's fields)."""
        return {
            "server_kind": self.server_kind,
            "kind_from": self.kind_from,
            "cursor": self.cursor,
            "lookback_days": self.lookback_days,
            "studies_window": self.studies_window,
            "studies_cursor": self.studies_cursor,
            "studies_both": self.studies_both,
            "limits": self.limits(),
        }


def with_studies(
    endpoint: Endpoint, query: Query, found: QueryResult, uids: tuple[str, ...]
) -> tuple[QueryResult, int, int]:
    """``found`` plus the series of the studies ``uids`` that it does not hold yet (a study
    found by the window is not queried again; series de-duplicated by key), restricted to a
    ``--study-uid-file`` list; returns (result, studies named, of those already found).

    Raises:
        DicomwebError: the added studies cannot be queried.
    """
    if query.study_uids:
        listed = set(query.study_uids)
        uids = tuple(u for u in uids if u in listed)
    uids = tuple(dict.fromkeys(uids))
    have = {h.study_uid for h in found.hits}
    new = tuple(u for u in uids if u not in have)
    if not new:
        return found, len(uids), len(uids)
    extra = query_series(endpoint, Query(modality=query.modality, study_uids=new))
    hits = {h.key: h for h in found.hits}
    for hit in extra.hits:
        hits.setdefault(hit.key, hit)
    dates = [d for d in (found.earliest_study_date, extra.earliest_study_date) if d]
    merged = replace(
        found,
        hits=sorted(hits.values(), key=lambda h: h.key),
        own_skipped=found.own_skipped + extra.own_skipped,
        earliest_study_date=min(dates, default=None),
    )
    return merged, len(uids), len(uids) - len(new)


def add_received(
    endpoint: Endpoint,
    query: Query,
    found: QueryResult,
    out_dir: Any,
    plan: Harvest,
    change_last: int | None,
) -> QueryResult:
    """``found`` (the StudyDate window of a ``--since last-run``) plus the studies the server
    received since the previous complete run of ``out_dir``, by ``plan.cursor``; the counts go
    in ``harvest`` and Orthanc's change-log position (``change_last``, read before the query)
    in ``cursor``, both to be recorded.

    Raises:
        DicomwebError: the change log, the receive-time search or the added studies cannot be
            queried.
    """
    uids: tuple[str, ...] = ()
    before_seq, before_time = recorded_cursor(out_dir), last_query_time(out_dir)
    if plan.cursor == CURSOR_ORTHANC and change_last is not None and before_seq is not None:
        uids = studies_received(endpoint, before_seq, change_last)
    elif plan.cursor == CURSOR_DCM4CHEE and before_time is not None:
        uids = studies_received_dcm4chee(endpoint, before_time)
    merged, named, both = with_studies(endpoint, query, found, uids) if uids else (found, 0, 0)
    harvest = replace(plan, studies_window=found.n_studies, studies_cursor=named)
    harvest = replace(harvest, studies_both=both)
    log.info(
        "--since last-run on a %s server: %d studies by the StudyDate window, %d by the %s "
        "cursor (%d of them in both)",
        plan.server_kind,
        found.n_studies,
        named,
        plan.cursor,
        both,
    )
    return replace(merged, cursor=change_last, harvest=harvest)
