"""A site's listed studies fetched from a PACS into a private temporary folder (``train
--archive dicomweb+...``): QIDO-RS finds their series, ``jobs.dicomweb_fetch.fetch_series``
retrieves them (Ray tasks), and the folder is read like any archive, then deleted.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from jobs.cluster import connect
from jobs.dicomweb_fetch import FetchReport, fetch_series
from pdd_batch.ingest.dicomweb import (
    SERIES_FOLDER,
    DicomwebError,
    Endpoint,
    Query,
    pacs_root,
    run_query,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PacsStudies:
    """Normal studies on a PACS: its endpoint and the query listing them (by StudyInstanceUID)."""

    endpoint: Endpoint
    query: Query


@contextmanager
def fetched_studies(
    studies: PacsStudies, *, address: str | None = None, num_cpus: int | None = None
) -> Iterator[tuple[Path, FetchReport]]:
    """Yield (folder holding the fetched series, fetch report); the folder is deleted on exit.

    Raises:
        DicomwebError: the PACS could not be queried, or it has no series of the studies.
    """
    found = run_query(studies.endpoint, studies.query)
    if not found.hits:
        raise DicomwebError("the PACS has no series of the listed studies")
    work = Path(tempfile.mkdtemp(prefix="pdd-pacs-"))  # 0700
    try:
        with connect(address, num_cpus=num_cpus):
            report = fetch_series(studies.endpoint, found.hits, work)
        log.info("fetched %d series (%d failed)", report.fetched, len(report.failed))
        yield pacs_root(work) / SERIES_FOLDER, report
    finally:
        shutil.rmtree(work, ignore_errors=True)
