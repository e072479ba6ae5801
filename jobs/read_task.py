"""Read tasks (Ray CPU workers): decode, window and slice one series into model-ready rows.

Each input row is a work unit (one series, as ``SeriesRef`` JSON). Output rows are slices
(``kind="slice"``) streamed while the series is sliced, in blocks of at most ``rows_per_block``
(a large series becomes several slice-range blocks that the actor pool scores in parallel and
that never sit in memory all at once), then one marker row: ``kind="end"`` with ``n_rows`` =
the number of slices and the series' warnings, ``kind="empty"`` when it gave no slice, or
``kind="error"`` when it failed to read. The driver commits a series only once its end marker
and all ``n_rows`` slices have arrived. The end marker's ``used_files`` (JSON list; "" on other
rows) names every file whose pixels went into the series' volumes: a slice reformatted to another
axis mixes all of them, though its ``source_file`` can name only one. Its ``unreadable_files``
(a JSON object; "" on other rows) maps each file of the series that could not be read or decoded
to why: the driver reports those files ``failed``. Paths travel only inside the pipeline (the
driver turns them into file keys); reasons and warnings never carry one.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from pdd_batch.ingest import keys
from pdd_batch.ingest.archive_io import IngestLimits
from pdd_batch.ingest.discovery import SeriesRef
from pdd_batch.ingest.preprocess import PreprocessError, PreprocessSpec
from pdd_batch.ingest.reasons import scrub_reason
from pdd_batch.ingest.slicing import iter_model_slices
from pdd_batch.ingest.volume import SeriesReadError, load_series
from pdd_batch.runs.lifecycle import failure_reason  # noqa: F401 - re-exported (cli, tests)
from pdd_batch.runs.rows import (  # noqa: F401 - KIND_* re-exported
    KIND_EMPTY,
    KIND_END,
    KIND_ERROR,
    KIND_SLICE,
    marker_row,
    slice_rows,
)

log = logging.getLogger(__name__)

# Errors a damaged or unsupported input can raise while decoding; programming errors
# (TypeError, AttributeError, NameError, ...) are not caught and fail the task loudly.
READ_ERRORS = (
    SeriesReadError,
    PreprocessError,
    OSError,
    ValueError,
    RuntimeError,
    NotImplementedError,
    MemoryError,
    EOFError,
)


def crash_once(marker: str | None) -> None:
    """Fault injection for tests: exit this worker process hard, once per marker file."""
    if not marker:
        return
    try:
        fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return
    os.close(fd)
    log.warning("fault injection: worker exits mid-task")
    os._exit(1)


def read_series(
    archive_root: Path,
    ref: SeriesRef,
    spec: PreprocessSpec,
    rows_per_block: int,
    crash_once_marker: str | None = None,
    limits: IngestLimits | None = None,
) -> Iterator[dict[str, Any]]:
    """Yield column blocks for one series (see the module docstring).

    ``crash_once_marker`` (tests only) kills the worker after its first block has been yielded,
    so Ray must retry the task and the driver must drop the repeated rows. ``limits``: the
    run's ingest caps.
    """
    n = 0
    try:
        series = load_series(archive_root, ref, limits)
        block: list = []
        for model_slice in iter_model_slices(series, spec):
            block.append(model_slice)
            n += 1
            if len(block) == rows_per_block:
                yield slice_rows(ref, block)
                block = []
                crash_once(crash_once_marker)
        if block:
            yield slice_rows(ref, block)
            crash_once(crash_once_marker)
    except READ_ERRORS as exc:
        reason = scrub_reason(keys.redact_paths(f"{type(exc).__name__}: {exc}", ref.files))
        log.warning(
            "series %s: read failed after %d slices (%s)", ref.series_key, n, type(exc).__name__
        )
        yield marker_row(ref, KIND_ERROR, reason, spec.image_size)
        return
    warnings = ""
    if series.warnings:
        warnings = scrub_reason(keys.redact_paths("; ".join(series.warnings), ref.files))
    bad = _unreadable_json(series.unreadable, ref)
    if n == 0:
        reason = warnings or "no slice in this series"
        yield marker_row(ref, KIND_EMPTY, reason, spec.image_size, unreadable_files=bad)
    else:
        used = sorted({f for volume in series.volumes for f in volume.source_files})
        yield marker_row(ref, KIND_END, warnings, spec.image_size, n, json.dumps(used), bad)


def _unreadable_json(unreadable: dict[str, str], ref: SeriesRef) -> str:
    """The series' unreadable files -> why (reasons scrubbed of paths and UIDs), as JSON."""
    if not unreadable:
        return ""
    return json.dumps(
        {f: scrub_reason(keys.redact_paths(r, ref.files)) for f, r in sorted(unreadable.items())}
    )


class ReadSeries:
    """``map_batches`` callable (a Ray task per block of work units; stateless)."""

    def __init__(
        self,
        archive_root: str,
        preprocessing: str,
        rows_per_block: int,
        crash_once_marker: str | None = None,
        limits: str | None = None,
        series_subkey: str | None = None,
    ) -> None:
        if series_subkey:  # the series sub-key only (``SiteKey.export_scoped``): matches stacks
            keys.install(keys.SiteKey.import_scoped(series_subkey))
        self.root = Path(archive_root)
        self.spec = PreprocessSpec.from_dict(json.loads(preprocessing))
        self.rows_per_block = rows_per_block
        self.crash_once_marker = crash_once_marker
        self.limits = IngestLimits.from_dict(json.loads(limits) if limits else None)

    def __call__(self, batch: dict[str, np.ndarray]) -> Iterator[dict[str, Any]]:
        for unit in batch["series"]:
            ref = SeriesRef.from_dict(json.loads(str(unit)))
            yield from read_series(
                self.root, ref, self.spec, self.rows_per_block, self.crash_once_marker, self.limits
            )


def read_series_fn(
    batch: dict[str, np.ndarray],
    *,
    archive_root: str,
    preprocessing: str,
    rows_per_block: int,
    crash_once_marker: str | None = None,
    limits: str | None = None,
    series_subkey: str | None = None,
) -> Iterator[dict[str, Any]]:
    """Function form of ``ReadSeries`` for ``map_batches`` tasks (fn_kwargs; ``limits`` JSON);
    ``series_subkey`` is the site's series sub-key (``SiteKey.export_scoped("series")``)."""
    reader = ReadSeries(
        archive_root, preprocessing, rows_per_block, crash_once_marker, limits, series_subkey
    )
    yield from reader(batch)
