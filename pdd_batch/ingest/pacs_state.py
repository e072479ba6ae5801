"""The run folder's record of what a PACS screen asked (``RUN/_pacs/query.json``, no UIDs) for
``--since last-run``, and the private folder it lives in (``RUN/_pacs``, 0700)."""

from __future__ import annotations

import json
import os
from datetime import date, datetime, timedelta, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pdd_batch.ingest.dicomweb_http import DicomwebError

if TYPE_CHECKING:  # the query type only: dicomweb imports this module
    from pdd_batch.ingest.dicomweb import Query

PACS_FOLDER = "_pacs"  # inside the run folder: readers and result scans skip "_" folders
QUERY_STATE = "query.json"


def pacs_root(out_dir: Path) -> Path:
    """``RUN/_pacs``: the private (0700) cache of fetched series and the query record."""
    root = Path(out_dir) / PACS_FOLDER
    private_dir(root)
    return root


def private_dir(path: Path) -> Path:
    """``path`` made (parents too) and set to 0700 whatever the umask."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(path, 0o700)
    return path


def recorded_cursor(out_dir: Path) -> int | None:
    """The Orthanc change-log cursor the previous complete run recorded, if any."""
    path = Path(out_dir) / PACS_FOLDER / QUERY_STATE
    value = json.loads(path.read_text()).get("orthanc_changes_last") if path.is_file() else None
    return value if isinstance(value, int) else None


def last_query_time(out_dir: Path) -> datetime | None:
    """When the previous complete run of this folder queried the PACS (UTC), if one did."""
    path = Path(out_dir) / PACS_FOLDER / QUERY_STATE
    if not path.is_file():
        return None
    stamp = json.loads(path.read_text()).get("last_query_utc")
    return datetime.fromisoformat(stamp) if stamp else None


def since_for_last_run(out_dir: Path, lookback_days: int = 1) -> date | None:
    """The ``StudyDate`` lower bound of ``--since last-run``: the previous query's day minus
    ``lookback_days`` (at least one: study dates are the modality's local day; more on a
    server without a received-time cursor, ``pdd_batch.ingest.pacs_harvest``); ``None``
    (everything) on a first run.

    Series already screened are skipped by the run state, so the overlap screens nothing twice.
    """
    stamp = last_query_time(out_dir)
    return None if stamp is None else (stamp - timedelta(days=max(lookback_days, 1))).date()


def record_query(
    out_dir: Path, started: datetime, query: Query, n_series: int, found: Any = None
) -> None:
    """Remember this query's start time (UTC) for the next ``--since last-run``, the Orthanc
    change-log cursor (``found.cursor``), and the widest date window asked so far
    (``earliest_since``, for finding the studies again on export; it reaches back to the
    earliest study found, ``found.earliest_study_date``, a late-received study included)."""
    path = pacs_root(out_dir) / QUERY_STATE
    previous = json.loads(path.read_text()) if path.is_file() else {}
    since = query.since
    found_date = getattr(found, "earliest_study_date", None)
    if since is not None and found_date is not None:
        since = min(since, found_date)
    earliest = since.isoformat() if since else None
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
        "orthanc_changes_last": getattr(found, "cursor", None),
    }
    harvest = getattr(found, "harvest", None)
    if harvest is not None:  # the server kind and cursor of this run (no UID, no date)
        record.update(
            pacs_kind=harvest.server_kind,
            cursor_kind=harvest.cursor,
            lookback_days=harvest.lookback_days,
        )
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(json.dumps(record, indent=1))
    os.chmod(tmp, 0o600)
    os.replace(tmp, path)


def parse_since(
    text: str | None, out_dir: Path, lookback_days: int = 1
) -> tuple[date | None, bool]:
    """``--since``: a date (YYYY-MM-DD or YYYYMMDD) or ``last-run`` (the previous complete
    run's query day minus ``lookback_days``); returns (date, is_last_run).

    Raises:
        DicomwebError: neither form.
    """
    if not text:
        return None, False
    if text == "last-run":
        return since_for_last_run(out_dir, lookback_days), True
    for fmt in ("%Y-%m-%d", "%Y%m%d"):
        try:
            return datetime.strptime(text, fmt).date(), False
        except ValueError:
            continue
    raise DicomwebError(f"--since wants YYYY-MM-DD or last-run, got {text!r}")
