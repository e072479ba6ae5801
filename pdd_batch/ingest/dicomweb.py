"""A PACS as a screening source over DICOMweb: endpoint and credentials, QIDO-RS queries, and
the run folder's record of what was asked (for ``--since last-run``, ``pacs_state``).

A source is written ``dicomweb+http://HOST:PORT/ROOT`` (or ``dicomweb+https://``). Credentials
come from the environment (``PDD_DICOMWEB_USER`` / ``PDD_DICOMWEB_PASSWORD``) or a netrc file,
never from the command line; TLS certificates are verified (``REQUESTS_CA_BUNDLE`` names a
site CA). Raw UIDs stay in memory: logs, errors and files written here name series by their
keys (``pdd_batch.ingest.keys``) and HTTP failures by their status code only (a URL holds UIDs).
"""

from __future__ import annotations

import hashlib
import json
import logging
import netrc
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import date, datetime, timezone
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from pdd_batch.ingest.dicomweb_http import (
    PASSWORD_ENV,
    USER_ENV,
    DicomwebAuthError,
    DicomwebError,
    Endpoint,
    get,
    http_failure,
    make_client,
    new_session,
    probe,
    quiet_http_logs,
)
from pdd_batch.ingest.keys import series_key
from pdd_batch.ingest.pacs_state import (
    PACS_FOLDER,
    QUERY_STATE,
    last_query_time,
    pacs_root,
    parse_since,
    private_dir,
    record_query,
    recorded_cursor,
    since_for_last_run,
)

__all__ = [  # the HTTP layer's and the query record's names, used through this module
    "PACS_FOLDER",
    "QUERY_STATE",
    "last_query_time",
    "pacs_root",
    "parse_since",
    "private_dir",
    "record_query",
    "recorded_cursor",
    "since_for_last_run",
    "PASSWORD_ENV",
    "USER_ENV",
    "DicomwebAuthError",
    "DicomwebError",
    "Endpoint",
    "http_failure",
    "make_client",
    "probe",
    "quiet_http_logs",
]

log = logging.getLogger(__name__)

SCHEME_PREFIX = "dicomweb+"
SERIES_FOLDER = "series"  # the archive that the screen reads: one folder per series key
PAGE_SIZE = 100
MAX_PAGES = 20_000  # 2 million series at 100 a page: a server that never ends is an error
UID_RE = re.compile(r"^[0-9]+(\.[0-9]+)*$")
TAG_STUDY_UID, TAG_SERIES_UID, TAG_SOP_UID = "0020000D", "0020000E", "00080018"
TAG_MODALITY, TAG_STUDY_DATE = "00080060", "00080020"
TAG_MANUFACTURER, TAG_SERIES_DESCRIPTION = "00080070", "0008103E"
# what the export stores back into a study (review/pacs_documents.py, pacs_overlays.py): SR and
# KOS with Manufacturer "pdd-batch", Secondary Capture overlays (modality OT) with a "PDD ..."
# series description. A later screen skips them at query (they are this product's output).
OWN_MANUFACTURER = "pdd-batch"
OWN_MODALITIES = ("SR", "KO", "OT")
OWN_DESCRIPTION_PREFIX = "PDD "
LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "::1")


def instance_file_name(sop_uid: str) -> str:
    """Cache file name of a fetched instance: a digest of its SOP Instance UID (no UID in a file
    name). Unkeyed on purpose: fetch workers need no site key, and the name says no more than
    the file it names; the run's outputs still name it only by its keyed ``file_key``."""
    return hashlib.sha256(f"instance\x1f{sop_uid}".encode()).hexdigest()[:16] + ".dcm"


def cache_relative_path(series_key: str, sop_uid: str) -> str:
    """Where an instance lies in the series cache (relative to ``RUN/_pacs/series``)."""
    return f"{series_key}/{instance_file_name(sop_uid)}"


def is_dicomweb_source(text: str | os.PathLike | None) -> bool:
    """Whether an ARCHIVE argument names a DICOMweb server rather than a folder."""
    return (
        str(text or "").lower().startswith((SCHEME_PREFIX + "http://", SCHEME_PREFIX + "https://"))
    )


def endpoint_from_source(
    source: str, netrc_file: Path | None = None, allow_insecure_http: bool = False
) -> Endpoint:
    """The endpoint of ``dicomweb+http(s)://HOST[:PORT]/ROOT`` with credentials resolved.

    Credentials: ``PDD_DICOMWEB_USER``/``PDD_DICOMWEB_PASSWORD`` when set, else the entry for the
    host in ``netrc_file`` (default ``~/.netrc`` when it exists), else none. A login is sent over
    plain ``http://`` only to a loopback host or with ``allow_insecure_http``.

    Raises:
        DicomwebError: not a DICOMweb source, credentials inside the URL, a netrc that is
            unreadable or readable by others, or a login over plain http to another host.
    """
    if not is_dicomweb_source(source):
        raise DicomwebError("a DICOMweb source is written dicomweb+http(s)://HOST[:PORT]/ROOT")
    url = source[len(SCHEME_PREFIX) :].rstrip("/")
    parts = urlsplit(url)
    if parts.username or parts.password:
        raise DicomwebError(
            f"put credentials in {USER_ENV}/{PASSWORD_ENV} or a netrc file, not in the URL"
        )
    user, password = os.environ.get(USER_ENV), os.environ.get(PASSWORD_ENV)
    if not user:
        user, password = _netrc_login(parts.hostname or "", netrc_file)
    endpoint = Endpoint(url=url, user=user or None, password=password)
    insecure = parts.scheme.lower() == "http" and not is_loopback(parts.hostname or "")
    if endpoint.user and insecure and not allow_insecure_http:
        raise DicomwebError(
            f"refusing to send the login in clear text over http:// to {endpoint.host}: "
            "use dicomweb+https://, or --allow-insecure-http on a trusted network"
        )
    return endpoint


def is_loopback(host: str) -> bool:
    """Whether ``host`` is this machine (``localhost``, 127.0.0.0/8, ``::1``)."""
    import ipaddress

    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def netrc_path(netrc_file: Path | None) -> Path:
    """The netrc file read: ``netrc_file``, else ``~/.netrc``."""
    return Path(netrc_file) if netrc_file else Path.home() / ".netrc"


def _netrc_login(host: str, netrc_file: Path | None) -> tuple[str | None, str | None]:
    path = netrc_path(netrc_file)
    if not path.is_file():
        if netrc_file:
            raise DicomwebError(f"netrc file not found: {path.name}")
        return None, None
    if path.stat().st_mode & 0o077:
        raise DicomwebError(
            f"netrc file {path.name} is readable by other users (chmod 600 {path.name})"
        )
    try:
        auth = netrc.netrc(str(path)).authenticators(host)
    except (netrc.NetrcParseError, OSError) as exc:
        raise DicomwebError(f"cannot read netrc file {path.name} ({type(exc).__name__})") from exc
    if auth is None:
        return None, None
    login, _account, password = auth
    return login or None, password or None


@dataclass(frozen=True)
class SeriesHit:
    """One series the query found (raw UIDs: kept in memory, never logged or written)."""

    study_uid: str
    series_uid: str
    modality: str = ""

    @property
    def key(self) -> str:
        """The run's series key (the same as a folder screen of the same files)."""
        return series_key(self.study_uid, self.series_uid)


@dataclass(frozen=True)
class Query:
    """What to ask the PACS: studies since a date, of a modality, or listed by UID."""

    since: date | None = None
    modality: str | None = None
    study_uids: tuple[str, ...] = ()

    def series_filters(self) -> dict[str, str]:
        """QIDO-RS match keys of a series search across studies (``/series?StudyDate=...``):
        the filtering happens on the server, and paging stays exact (unlike a study search on
        ``ModalitiesInStudy``, which Orthanc filters after applying ``limit``/``offset``)."""
        filters: dict[str, str] = {}
        if self.since is not None:
            filters["StudyDate"] = self.since.strftime("%Y%m%d") + "-"
        if self.modality:
            filters["Modality"] = self.modality
        return filters


def _value(item: dict, tag: str) -> str:
    values = item.get(tag, {}).get("Value") or [""]
    return str(values[0])


def paged(
    search: Any, page_size: int = PAGE_SIZE, max_pages: int = MAX_PAGES, **kwargs: Any
) -> Iterator[dict]:
    """Every result of a QIDO-RS search, page by page (``limit``/``offset``).

    Only an empty page ends the query: a short page may be a server's own result cap (fewer
    than ``limit``), so the next offset is asked too (one request more per query). A page
    the server sent before (it ignores ``offset``) ends it; more than ``max_pages`` pages is
    an error (a server that never ends).

    Raises:
        DicomwebError: over ``max_pages`` pages.
    """
    offset = 0
    seen: set[str] = set()
    for _ in range(max_pages):
        page = search(limit=page_size, offset=offset, **kwargs)
        if not page:
            return
        digest = hashlib.sha256(json.dumps(page, sort_keys=True, default=str).encode()).hexdigest()
        if digest in seen:
            log.warning("QIDO-RS: the server sent a page again (it ignores offset); query ends")
            return
        seen.add(digest)
        yield from page
        offset += len(page)
    raise DicomwebError(f"QIDO-RS query: the server sent more than {max_pages} pages")


SERIES_FIELDS = (TAG_MANUFACTURER, TAG_SERIES_DESCRIPTION, TAG_MODALITY, TAG_STUDY_DATE)


def qido_search(
    session: Any,
    endpoint: Endpoint,
    path: str,
    filters: dict[str, str],
    fields: tuple[str, ...] = SERIES_FIELDS,
) -> Any:
    """A ``search(limit=, offset=)`` of ``path`` (``/series``, ``/studies/UID/series``,
    ``/studies``): one QIDO-RS request per call, ``fields`` added to what the server returns,
    DICOM JSON list out (a connection failure is not retried)."""
    fields = ",".join(fields)

    def search(limit: int, offset: int) -> list[dict]:
        params = {**filters, "limit": limit, "offset": offset, "includefield": fields}
        response = get(session, endpoint, path, what="QIDO-RS query", params=params)
        if response.status_code == 204 or not response.content:
            return []
        try:
            items = response.json()
        except ValueError:
            raise DicomwebError("QIDO-RS answer is not DICOM JSON (wrong root?)") from None
        if not isinstance(items, list) or not all(isinstance(i, dict) for i in items):
            raise DicomwebError("QIDO-RS answer is not a list of DICOM JSON objects")
        return items

    return search


def is_own_series(item: dict) -> bool:
    """Whether a QIDO-RS series is one the export stored (an SR, KOS or overlay series)."""
    if _value(item, TAG_MANUFACTURER) == OWN_MANUFACTURER:
        return True
    modality = _value(item, TAG_MODALITY).upper()
    described = _value(item, TAG_SERIES_DESCRIPTION).startswith(OWN_DESCRIPTION_PREFIX)
    return modality in OWN_MODALITIES and described


@dataclass(frozen=True)
class QueryResult:
    """The series a query found, when it was asked (the next ``--since last-run``) and how many
    series of the product's own output (SR, KOS, overlays) it left out."""

    started: datetime
    hits: list[SeriesHit]
    own_skipped: int = 0
    earliest_study_date: date | None = None  # of the hits (the export's search window)
    cursor: int | None = None  # Orthanc's change log position before the query, if any
    harvest: Any = None  # pdd_batch.ingest.pacs_harvest.Harvest: server kind, cursor, counts

    @property
    def n_studies(self) -> int:
        """Studies the hits belong to."""
        return len({h.study_uid for h in self.hits})


def query_series(
    endpoint: Endpoint, query: Query, page_size: int = PAGE_SIZE, max_pages: int = MAX_PAGES
) -> QueryResult:
    """The series of the studies matching ``query`` (QIDO-RS, paged), without the series the
    export stored (``is_own_series``).

    Raises:
        DicomwebAuthError: credentials refused or missing.
        DicomwebError: the server could not be queried.
    """
    started = datetime.now(timezone.utc)
    filters = query.series_filters()
    paths = [f"/studies/{uid}/series" for uid in query.study_uids] or ["/series"]
    hits: dict[str, SeriesHit] = {}
    own, dates = 0, set()
    with new_session(endpoint) as session:
        for path in paths:
            search = qido_search(session, endpoint, path, filters)
            for item in paged(search, page_size, max_pages):
                if is_own_series(item):
                    own += 1
                    continue
                modality = _value(item, TAG_MODALITY)
                hit = SeriesHit(_value(item, TAG_STUDY_UID), _value(item, TAG_SERIES_UID), modality)
                hits.setdefault(hit.key, hit)
                dates.add(_value(item, TAG_STUDY_DATE))
    log.info("QIDO-RS: %d series (%d of this product's own output left out)", len(hits), own)
    hit_list = sorted(hits.values(), key=lambda h: h.key)
    return QueryResult(started, hit_list, own, _earliest(dates))


def _earliest(dates: set[str]) -> date | None:
    """The earliest valid YYYYMMDD of ``dates`` (others ignored)."""
    parsed = []
    for text in dates:
        try:
            parsed.append(datetime.strptime(text, "%Y%m%d").date())
        except ValueError:
            continue
    return min(parsed, default=None)


def run_query(endpoint: Endpoint, query: Query) -> QueryResult:
    """Ask the PACS (see ``query_series``; raises ``DicomwebError``)."""
    return query_series(endpoint, query)


def read_study_uid_file(path: Path) -> tuple[str, ...]:
    """StudyInstanceUIDs, one a line (blank lines and ``#`` comments ignored).

    Raises:
        DicomwebError: a line that is not a UID (the message gives its line number only).
    """
    uids = []
    for n, line in enumerate(Path(path).read_text().splitlines(), 1):
        text = line.split("#", 1)[0].strip()
        if not text:
            continue
        if not UID_RE.match(text) or len(text) > 64:
            raise DicomwebError(f"study UID file, line {n}: not a UID")
        uids.append(text)
    return tuple(uids)
