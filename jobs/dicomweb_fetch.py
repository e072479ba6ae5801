"""Screening a PACS: QIDO-RS finds the series, Ray tasks fetch each with WADO-RS into the run's
private cache (``RUN/_pacs/series/<series key>/``), then the folder screen (``jobs.screen``)
reads that cache unchanged.

A series is fetched once: it is written to a staging folder and renamed into the cache only
when complete, so a killed run refetches only what it had not finished. A failed retrieve
(after the client's retries with backoff) is an error row of the run, never a crash.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

import ray

from jobs.cluster import connect
from jobs.screen import ScreenResult, run_screen
from pdd_batch.ingest.dicomweb import (
    SERIES_FOLDER,
    DicomwebError,
    Endpoint,
    Query,
    QueryResult,
    SeriesHit,
    http_failure,
    instance_file_name,
    pacs_root,
    private_dir,
    quiet_http_logs,
    record_query,
    run_query,
)
from pdd_batch.ingest.dicomweb_retrieve import DEFAULT_LIMITS, FetchLimits, retrieve_series
from pdd_batch.ingest.discovery import FileRecord
from pdd_batch.runs.config import RunConfig
from pdd_batch.runs.manifest import STATUS_COMPLETE

log = logging.getLogger(__name__)

STAGING_FOLDER = "staging"
MAX_IN_FLIGHT = 8


@dataclass(frozen=True)
class FetchOutcome:
    """One series' retrieve: instances written, or the path-free reason it failed."""

    key: str
    n_instances: int = 0
    error: str | None = None


@dataclass
class FetchReport:
    """What the fetch stage did: series found, already cached, fetched now, failed."""

    found: int = 0
    cached: int = 0
    fetched: int = 0
    instances: int = 0
    failed: dict[str, str] = field(default_factory=dict)  # series key -> reason

    def records(self) -> list[FileRecord]:
        """One failed input per series that could not be fetched (for the errors table)."""
        return [FileRecord(f"{k}/", "failed", r, k) for k, r in sorted(self.failed.items())]


def fetch_one(
    endpoint: Endpoint,
    hit: SeriesHit,
    series_root: Path,
    staging: Path,
    limits: FetchLimits = DEFAULT_LIMITS,
) -> FetchOutcome:
    """Retrieve one series (WADO-RS, streamed to disk under ``limits``) into
    ``series_root/<key>/`` (0700, files 0600); never raises."""
    quiet_http_logs()  # this may be a fresh Ray worker: no URL, no pydicom warning with a UID
    target = series_root / hit.key
    tmp = Path(tempfile.mkdtemp(prefix=f"{hit.key}-", dir=staging))  # 0700
    try:
        n = retrieve_series(
            endpoint, hit.study_uid, hit.series_uid, tmp, instance_file_name, limits
        )
        if n == 0:
            raise DicomwebError("WADO-RS retrieve returned no instances")
        try:
            os.replace(tmp, target)
        except OSError:  # another run cached it meanwhile: keep theirs
            if not target.is_dir():
                raise
        return FetchOutcome(hit.key, n)
    except DicomwebError as exc:
        return FetchOutcome(hit.key, error=str(exc))
    except Exception as exc:  # noqa: BLE001 - any failure of one series is its error row
        return FetchOutcome(hit.key, error=str(http_failure("WADO-RS retrieve", exc, endpoint)))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@ray.remote(num_cpus=0.25, max_retries=2)
def _fetch_task(
    endpoint: Endpoint, hit: SeriesHit, series_root: str, staging: str, limits: FetchLimits
) -> FetchOutcome:
    return fetch_one(endpoint, hit, Path(series_root), Path(staging), limits)


def fetch_series(
    endpoint: Endpoint,
    hits: list[SeriesHit],
    out_dir: Path,
    on_done: Callable[[int, int], None] | None = None,
    limits: FetchLimits = DEFAULT_LIMITS,
) -> FetchReport:
    """Fetch every series of ``hits`` not yet cached, as Ray tasks (Ray must be connected when
    there is anything to fetch)."""
    root = pacs_root(out_dir)
    series_root, staging = root / SERIES_FOLDER, root / STAGING_FOLDER
    shutil.rmtree(staging, ignore_errors=True)  # leftovers of a killed run
    private_dir(series_root)
    private_dir(staging)
    todo = [h for h in hits if not (series_root / h.key).is_dir()]
    report = FetchReport(found=len(hits), cached=len(hits) - len(todo))
    pending: list[ray.ObjectRef] = []
    queue = list(todo)
    while queue or pending:
        while queue and len(pending) < MAX_IN_FLIGHT:
            hit = queue.pop(0)
            args = (endpoint, hit, str(series_root), str(staging), limits)
            pending.append(_fetch_task.remote(*args))
        ready, pending = ray.wait(pending, num_returns=1)
        outcome: FetchOutcome = ray.get(ready[0])
        if outcome.error:
            report.failed[outcome.key] = outcome.error
        else:
            report.fetched += 1
            report.instances += outcome.n_instances
        if on_done is not None:
            on_done(report.fetched + len(report.failed), len(todo))
    shutil.rmtree(staging, ignore_errors=True)
    log.info(
        "fetch: %d series found, %d cached, %d fetched, %d failed",
        report.found,
        report.cached,
        report.fetched,
        len(report.failed),
    )
    return report


def pacs_summary(found: QueryResult, report: FetchReport) -> dict:
    """The manifest's ``pacs`` section: how the studies were chosen (server kind, cursor, its
    limits, studies found by each part; ``pdd_batch.ingest.pacs_harvest.Harvest``) and what
    the fetch did (series found, cached by earlier runs, fetched now, failed). Counts only."""
    harvest = found.harvest.to_dict() if found.harvest is not None else {}
    return {
        **harvest,
        "series_found": report.found,
        "series_cached": report.cached,
        "series_fetched": report.fetched,
        "series_fetch_failed": len(report.failed),
    }


@dataclass(frozen=True)
class PacsScreenResult:
    """A PACS screen: the fetch stage's report and the folder screen's result."""

    fetch: FetchReport
    screen: ScreenResult


def screen_pacs(
    cfg: RunConfig,
    endpoint: Endpoint,
    query: Query,
    progress: Callable | None = None,
    on_fetch: Callable[[int, int], None] | None = None,
    found: QueryResult | None = None,
    crosswalk: Path | None = None,
    limits: FetchLimits = DEFAULT_LIMITS,
) -> PacsScreenResult:
    """Query (unless ``found`` is the query's result already), fetch and screen;
    ``cfg.archive`` is replaced by the run's series cache.

    The query's start time is recorded for ``--since last-run`` only when every series was
    fetched and the run completed (otherwise the next run asks for the same window again;
    series screened already are skipped by the run state).

    Raises:
        DicomwebAuthError: credentials refused.
        DicomwebError: the PACS could not be queried.
    """
    found = found or run_query(endpoint, query)
    hits = found.hits
    series_root = private_dir(pacs_root(cfg.out_dir) / SERIES_FOLDER)
    need_ray = any(not (series_root / h.key).is_dir() for h in hits)
    with ExitStack() as stack:
        if need_ray:
            stack.enter_context(connect(cfg.resolved_address, num_cpus=cfg.num_cpus))
        report = fetch_series(endpoint, hits, cfg.out_dir, on_done=on_fetch, limits=limits)
        result = run_screen(
            cfg.with_updates(archive=series_root),
            progress,
            crosswalk=crosswalk,
            source_errors=report.records(),
            source_summary=pacs_summary(found, report),
        )
    if not report.failed and result.status == STATUS_COMPLETE:
        record_query(cfg.out_dir, found.started, query, len(hits), found)
    return PacsScreenResult(report, result)
