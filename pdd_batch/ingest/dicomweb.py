"""A PACS as a screening source over DICOMweb: endpoint and credentials, QIDO-RS queries, and
the run folder's record of what was asked (for ``--since last-run``).

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
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta, timezone
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from pdd_batch.ingest.keys import series_key

log = logging.getLogger(__name__)

SCHEME_PREFIX = "dicomweb+"
USER_ENV, PASSWORD_ENV = "PDD_DICOMWEB_USER", "PDD_DICOMWEB_PASSWORD"
PACS_FOLDER = "_pacs"  # inside the run folder: readers and result scans skip "_" folders
SERIES_FOLDER = "series"  # the archive that the screen reads: one folder per series key
QUERY_STATE = "query.json"
PAGE_SIZE = 100
RETRY_CODES = (408, 429, 500, 502, 503, 504)
UID_RE = re.compile(r"^[0-9]+(\.[0-9]+)*$")
TAG_STUDY_UID, TAG_SERIES_UID, TAG_SOP_UID = "0020000D", "0020000E", "00080018"
TAG_MODALITY, TAG_STUDY_DATE = "00080060", "00080020"

# Request URLs hold UIDs: dicomweb-client logs them at DEBUG/INFO, urllib3 at DEBUG, and retrying
# logs each failed attempt (an exception's text holds the URL) as a warning. ``quiet_http_logs``
# keeps them out of every process that talks to the PACS (the driver and the fetch workers).
QUIET_LOGGERS = {
    "dicomweb_client": logging.WARNING,
    "retrying": logging.ERROR,
    "urllib3": logging.ERROR,
}


def quiet_http_logs() -> None:
    """Raise the level of the loggers that would print request URLs (UIDs)."""
    for name, level in QUIET_LOGGERS.items():
        logger = logging.getLogger(name)
        if logger.getEffectiveLevel() < level:
            logger.setLevel(level)


class DicomwebError(RuntimeError):
    """The PACS could not be used; the message holds no URL path, UID or credential."""


class DicomwebAuthError(DicomwebError):
    """The PACS refused the credentials (HTTP 401/403)."""


@dataclass(frozen=True)
class Endpoint:
    """A DICOMweb root with its credentials (the password never shows in a repr)."""

    url: str  # http(s)://host:port/root, no trailing slash
    user: str | None = None
    password: str | None = field(default=None, repr=False)
    timeout_s: float = 60.0
    max_attempts: int = 4
    backoff_ms: int = 500

    @property
    def host(self) -> str:
        """``host:port`` (for messages: no path, no credentials)."""
        return urlsplit(self.url).netloc.rsplit("@", 1)[-1]


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


def endpoint_from_source(source: str, netrc_file: Path | None = None) -> Endpoint:
    """The endpoint of ``dicomweb+http(s)://HOST[:PORT]/ROOT`` with credentials resolved.

    Credentials: ``PDD_DICOMWEB_USER``/``PDD_DICOMWEB_PASSWORD`` when set, else the entry for the
    host in ``netrc_file`` (default ``~/.netrc`` when it exists), else none.

    Raises:
        DicomwebError: not a DICOMweb source, credentials inside the URL, or an unreadable netrc.
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
    return Endpoint(url=url, user=user or None, password=password)


def _netrc_login(host: str, netrc_file: Path | None) -> tuple[str | None, str | None]:
    path = Path(netrc_file) if netrc_file else Path.home() / ".netrc"
    if not path.is_file():
        if netrc_file:
            raise DicomwebError(f"netrc file not found: {path.name}")
        return None, None
    try:
        auth = netrc.netrc(str(path)).authenticators(host)
    except (netrc.NetrcParseError, OSError) as exc:
        raise DicomwebError(f"cannot read netrc file {path.name} ({type(exc).__name__})") from exc
    if auth is None:
        return None, None
    login, _account, password = auth
    return login or None, password or None


def make_client(endpoint: Endpoint) -> Any:
    """A ``dicomweb_client.DICOMwebClient`` with retries (exponential backoff) on 408/429/5xx."""
    import requests
    from dicomweb_client import DICOMwebClient

    quiet_http_logs()
    session = requests.Session()
    if endpoint.user:
        session.auth = (endpoint.user, endpoint.password or "")
    client = DICOMwebClient(endpoint.url, session=session, timeout=endpoint.timeout_s)
    client.set_http_retry_params(
        retry=endpoint.max_attempts > 1,
        max_attempts=max(endpoint.max_attempts, 1),
        wait_exponential_multiplier=endpoint.backoff_ms,
        retriable_error_codes=RETRY_CODES,
    )
    return client


def http_failure(what: str, exc: BaseException) -> DicomwebError:
    """A path-free error for a failed request: the status code, or the exception's type."""
    import requests
    from retrying import RetryError

    response = getattr(exc, "response", None)
    if isinstance(exc, RetryError):  # retries spent: the last attempt's response or exception
        value = exc.last_attempt.value
        if isinstance(value, tuple) and len(value) == 3:
            exc = value[1]
            response = getattr(exc, "response", None)
        else:
            response = value
    code = getattr(response, "status_code", None)
    if code in (401, 403):
        return DicomwebAuthError(f"{what}: the server refused the credentials (HTTP {code})")
    if code is not None:
        return DicomwebError(f"{what} failed (HTTP {code})")
    if isinstance(exc, requests.exceptions.SSLError):
        return DicomwebError(
            f"{what} failed: TLS certificate not verified (set REQUESTS_CA_BUNDLE)"
        )
    return DicomwebError(f"{what} failed ({type(exc).__name__})")


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


def paged(search: Any, page_size: int = PAGE_SIZE, **kwargs: Any) -> Iterator[dict]:
    """Every result of a QIDO-RS search, page by page (``limit``/``offset``)."""
    offset = 0
    while True:
        page = search(limit=page_size, offset=offset, **kwargs)
        yield from page
        if len(page) < page_size:
            return
        offset += len(page)


def query_series(client: Any, query: Query, page_size: int = PAGE_SIZE) -> list[SeriesHit]:
    """The series of the studies matching ``query`` (QIDO-RS, paged).

    Raises:
        DicomwebAuthError: credentials refused.
        DicomwebError: the server could not be queried.
    """
    try:
        return _query_series(client, query, page_size)
    except DicomwebError:
        raise
    except Exception as exc:  # requests/HTTP failures: a path-free message
        raise http_failure("QIDO-RS query", exc) from None


def _query_series(client: Any, query: Query, page_size: int) -> list[SeriesHit]:
    filters = query.series_filters()
    if query.study_uids:
        found: Iterator[dict] = (
            item
            for uid in query.study_uids
            for item in paged(
                client.search_for_series,
                page_size,
                study_instance_uid=uid,
                search_filters=filters,
            )
        )
    else:
        found = paged(client.search_for_series, page_size, search_filters=filters)
    hits: dict[str, SeriesHit] = {}
    for item in found:
        hit = SeriesHit(
            _value(item, TAG_STUDY_UID), _value(item, TAG_SERIES_UID), _value(item, TAG_MODALITY)
        )
        hits.setdefault(hit.key, hit)
    log.info("QIDO-RS: %d series", len(hits))
    return sorted(hits.values(), key=lambda h: h.key)


@dataclass(frozen=True)
class QueryResult:
    """The series a query found and when it was asked (the next ``--since last-run``)."""

    started: datetime
    hits: list[SeriesHit]


def run_query(endpoint: Endpoint, query: Query) -> QueryResult:
    """Ask the PACS (see ``query_series``; raises ``DicomwebError``)."""
    started = datetime.now(timezone.utc)
    return QueryResult(started, query_series(make_client(endpoint), query))


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


def pacs_root(out_dir: Path) -> Path:
    """``RUN/_pacs``: the private (0700) cache of fetched series and the query record."""
    root = Path(out_dir) / PACS_FOLDER
    root.mkdir(parents=True, exist_ok=True)
    os.chmod(root, 0o700)
    return root


def last_query_time(out_dir: Path) -> datetime | None:
    """When the previous complete run of this folder queried the PACS (UTC), if one did."""
    path = Path(out_dir) / PACS_FOLDER / QUERY_STATE
    if not path.is_file():
        return None
    stamp = json.loads(path.read_text()).get("last_query_utc")
    return datetime.fromisoformat(stamp) if stamp else None


def since_for_last_run(out_dir: Path) -> date | None:
    """The ``StudyDate`` lower bound of ``--since last-run``: the previous query's day minus one
    (study dates are the modality's local day); ``None`` (everything) on a first run.

    Series already screened are skipped by the run state, so the overlap screens nothing twice.
    """
    stamp = last_query_time(out_dir)
    return None if stamp is None else (stamp - timedelta(days=1)).date()


def record_query(out_dir: Path, started: datetime, query: Query, n_series: int) -> None:
    """Remember this query's start time (UTC) for the next ``--since last-run``, and the widest
    date window asked so far (``earliest_since``, for finding the studies again on export)."""
    path = pacs_root(out_dir) / QUERY_STATE
    previous = json.loads(path.read_text()) if path.is_file() else {}
    earliest = query.since.isoformat() if query.since else None
    if "earliest_since" in previous:
        before = previous["earliest_since"]
        earliest = None if before is None or earliest is None else min(before, earliest)
    record = {
        "last_query_utc": started.astimezone(timezone.utc).isoformat(),
        "since": query.since.isoformat() if query.since else None,
        "earliest_since": earliest,
        "modality": query.modality,
        "study_uid_list": bool(query.study_uids),  # whether a list was given (never the UIDs)
        "series_found": n_series,
    }
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(record, indent=1))
    os.replace(tmp, path)


def parse_since(text: str | None, out_dir: Path) -> tuple[date | None, bool]:
    """``--since``: a date (YYYY-MM-DD or YYYYMMDD) or ``last-run``; returns (date, is_last_run).

    Raises:
        DicomwebError: neither form.
    """
    if not text:
        return None, False
    if text == "last-run":
        return since_for_last_run(out_dir), True
    for fmt in ("%Y-%m-%d", "%Y%m%d"):
        try:
            return datetime.strptime(text, fmt).date(), False
        except ValueError:
            continue
    raise DicomwebError(f"--since wants YYYY-MM-DD or last-run, got {text!r}")


def probe(endpoint: Endpoint) -> str:
    """One QIDO-RS request (``/studies?limit=1``): what a doctor line says about the endpoint.

    Raises:
        DicomwebError: the endpoint does not answer as a DICOMweb server (auth included).
    """
    client = make_client(Endpoint(endpoint.url, endpoint.user, endpoint.password, 15.0, 1))
    try:
        client.search_for_studies(limit=1)
    except Exception as exc:  # requests/HTTP failures: a path-free message
        raise http_failure(f"DICOMweb {endpoint.host}", exc) from None
    return f"QIDO-RS answers at {endpoint.host}"
