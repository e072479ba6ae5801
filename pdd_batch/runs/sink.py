"""The driver side of streaming writes: rows in, durable Parquet parts out, series by series.

Rows arrive from the actor pool in any order, a series possibly spread over several blocks.
``SliceSink`` keeps a series' rows (deduplicated by ``slice_key``, so a retried block can never
duplicate a slice) until its end marker and all the ``n_rows`` slices it announces have
arrived, then buffers the complete series; when the
buffer holds ``rows_per_file`` slices or ``flush_seconds`` have passed it writes one part file
atomically into the run state's hidden store (``_state/parts/`` and ``_state/heatmap_parts/``,
which readers never see) and only then records its series as done (one SQLite transaction);
``RunState.publish`` makes them live in ``slices/`` and ``heatmaps/`` at the end.

Rows name their file by ``file_key`` (a keyed digest of the relative path the read task gives);
no path reaches a Parquet part or the run state.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from pdd_batch.ingest.discovery import SeriesRef
from pdd_batch.ingest.keys import file_key
from pdd_batch.runs.manifest import UNREADABLE_PREFIX
from pdd_batch.runs.rows import KIND_EMPTY, KIND_END, KIND_ERROR, KIND_SLICE
from pdd_batch.runs.schema import SLICES_SCHEMA
from pdd_batch.runs.state import RunState, SeriesRecord
from pdd_batch.runs.writer import rows_to_table

log = logging.getLogger(__name__)

NO_SLICE_REASON = "no slice was taken from this file"


@dataclass(frozen=True)
class Provenance:
    """Columns written on every slice row."""

    model_id: str
    checkpoint_hash: str
    preprocessing: str  # PreprocessSpec JSON
    run_id: str
    code_version: str
    threshold: float | None = None
    ood_threshold: float | None = None  # the model's in-distribution check, if it has one


def _ood(
    batch: Mapping[str, np.ndarray], i: int, threshold: float | None
) -> tuple[float | None, bool | None]:
    """(distance to the training slices, beyond the threshold?) of row ``i``; (None, None) when
    the model has no in-distribution check."""
    if "ood_distance" not in batch or threshold is None:
        return None, None
    dist = float(batch["ood_distance"][i])
    return (None, None) if dist != dist else (dist, dist > threshold)


def _unreadable(reason: str) -> str:
    """The recorded reason of a file the read stage could not read (a ``failed`` input)."""
    return UNREADABLE_PREFIX + reason


def slice_key(series_key: str, volume_index: int, slice_index: int) -> str:
    """Unique key of a slice within a run folder."""
    return f"{series_key}:{volume_index}:{slice_index}"


@dataclass
class _Series:
    expected: int | None = None
    rows: dict[str, dict[str, Any]] = field(default_factory=dict)
    warnings: str = ""
    used_files: frozenset[str] = frozenset()  # from the end marker (reformatted slices)
    unreadable: dict[str, str] = field(default_factory=dict)  # end marker: file -> why
    sources: set[str] = field(default_factory=set)  # relative paths of the rows' files


@dataclass
class SinkStats:
    """What the sink has seen and committed so far."""

    slices_received: int = 0
    slices_written: int = 0
    series_committed: int = 0
    parts_written: int = 0
    duplicates_dropped: int = 0
    actor_peak_rss_mb: dict[int, float] = field(default_factory=dict)  # actor pid -> MiB


class SliceSink:
    """Collects scored rows and commits complete series (see module docstring)."""

    def __init__(
        self,
        state: RunState,
        provenance: Provenance,
        series: Mapping[str, SeriesRef],
        fingerprints: Mapping[str, str],
        part_names: Iterator[str],
        *,
        rows_per_file: int = 4096,
        flush_seconds: float = 30.0,
        on_commit: Callable[[SinkStats], None] | None = None,
        models: Mapping[str, Provenance] | None = None,
    ) -> None:
        self.state, self.prov = state, provenance
        self.models = dict(models or {})  # model_id -> provenance, for routed model sets
        self.series, self.fingerprints = series, fingerprints
        self.part_names = part_names
        self.rows_per_file, self.flush_seconds = rows_per_file, flush_seconds
        self.on_commit = on_commit
        self.failed: dict[str, str] = {}
        self.stats = SinkStats()
        self._open: dict[str, _Series] = {}
        self._complete: set[str] = set()  # ready or committed: late (retried) rows are ignored
        self._ready: list[str] = []
        self._ready_rows = 0
        self._last_flush = time.monotonic()

    @property
    def open_series(self) -> list[str]:
        """Series with some rows but not all (lost if the stream ends now)."""
        return sorted(self._open)

    def _provenance(self, batch: Mapping[str, np.ndarray], i: int) -> Provenance:
        """The provenance of the model that scored row ``i`` (a model set: by its model_id)."""
        if self.models and "model_id" in batch:
            return self.models[str(batch["model_id"][i])]
        return self.prov

    def _row(self, batch: Mapping[str, np.ndarray], i: int) -> dict[str, Any]:
        p = self._provenance(batch, i)
        score = float(batch["score"][i])
        dist, ood = _ood(batch, i, p.ood_threshold)
        flagged = p.threshold is not None and score > p.threshold and not ood
        key = str(batch["series_key"][i])
        vol, sl = int(batch["volume_index"][i]), int(batch["slice_index"][i])
        return {
            "slice_key": slice_key(key, vol, sl),
            "study_key": str(batch["study_key"][i]),
            "series_key": key,
            "volume_index": vol,
            "slice_index": sl,
            "file_key": file_key(str(batch["source_file"][i])),
            "modality": str(batch["modality"][i]) or None,
            "score": score,
            "threshold": p.threshold,
            "flagged": bool(flagged),
            "heatmap_png": bytes(batch["heatmap_png"][i]),
            "heatmap_max": float(batch["heatmap_max"][i]),
            "model_id": p.model_id,
            "checkpoint_hash": p.checkpoint_hash,
            "preprocessing": p.preprocessing,
            "run_id": p.run_id,
            "code_version": p.code_version,
            "ood_distance": dist,
            "out_of_distribution": ood,
        }

    def add(self, batch: Mapping[str, np.ndarray]) -> None:
        """Take one batch of scored rows (numpy columns as produced by the predictor)."""
        if "actor_pid" in batch and len(batch["actor_pid"]):
            for pid, rss in zip(batch["actor_pid"], batch["actor_peak_rss_mb"], strict=True):
                peaks = self.stats.actor_peak_rss_mb
                peaks[int(pid)] = max(peaks.get(int(pid), 0.0), float(rss))
        for i, kind in enumerate(batch["kind"]):
            key = str(batch["series_key"][i])
            if key not in self.series:
                raise KeyError(f"row of a series that is not in this run: {key}")
            if key in self._complete:
                self.stats.duplicates_dropped += 1
                continue
            if kind == KIND_ERROR:
                self.failed[key] = str(batch["reason"][i])
                self._complete.add(key)
                self._open.pop(key, None)
                continue
            entry = self._open.setdefault(key, _Series())
            if kind == KIND_SLICE:
                row = self._row(batch, i)
                if row["slice_key"] in entry.rows:
                    self.stats.duplicates_dropped += 1
                else:
                    entry.rows[row["slice_key"]] = row
                    entry.sources.add(str(batch["source_file"][i]))
                    self.stats.slices_received += 1
            elif kind in (KIND_END, KIND_EMPTY):
                entry.expected = int(batch["n_rows"][i])
                entry.warnings = str(batch["reason"][i])
                if "used_files" in batch and str(batch["used_files"][i]):
                    entry.used_files = frozenset(json.loads(str(batch["used_files"][i])))
                if "unreadable_files" in batch and str(batch["unreadable_files"][i]):
                    entry.unreadable = dict(json.loads(str(batch["unreadable_files"][i])))
            else:
                raise ValueError(f"unknown row kind {kind!r} for series {key}")
            if entry.expected is not None and len(entry.rows) >= entry.expected:
                self._complete.add(key)
                self._ready.append(key)
                self._ready_rows += len(entry.rows)
        if self._ready_rows >= self.rows_per_file or (
            self._ready and time.monotonic() - self._last_flush >= self.flush_seconds
        ):
            self.flush()

    def _record(self, key: str, part: str, n: int) -> SeriesRecord:
        ref, entry = self.series[key], self._open[key]
        used = entry.sources | entry.used_files
        reason = entry.warnings if entry.warnings and not entry.rows else NO_SLICE_REASON
        if entry.warnings and entry.rows:
            reason = f"{NO_SLICE_REASON} ({entry.warnings})"
        dropped = tuple(
            (file_key(f), _unreadable(entry.unreadable[f]) if f in entry.unreadable else reason)
            for f in (*ref.files, *ref.spares)
            if f not in used
        )
        return SeriesRecord(part, n, self.fingerprints[key], ref.study_key, dropped)

    def flush(self) -> None:
        """Write buffered complete series as one part, then record them as done."""
        self._last_flush = time.monotonic()
        if not self._ready:
            return
        keys, self._ready, self._ready_rows = self._ready, [], 0
        rows = [r for k in keys for r in self._open[k].rows.values()]
        records: dict[str, SeriesRecord] = {}
        if rows:
            part = next(self.part_names)
            self.state.write_part(part, rows_to_table(rows, SLICES_SCHEMA))
            records = {k: self._record(k, part, len(self._open[k].rows)) for k in keys}
            self.state.commit_part(part, records)
            self.stats.parts_written += 1
        else:
            records = {k: self._record(k, "", 0) for k in keys}
            self.state.commit_empty(records)
        for k in keys:
            del self._open[k]
        self.stats.slices_written += len(rows)
        self.stats.series_committed += len(keys)
        log.debug("committed %d series (%d slices)", len(keys), len(rows))
        if self.on_commit:
            self.on_commit(self.stats)

    def close(self) -> None:
        """Flush what is complete; incomplete series stay uncommitted (the next run redoes them)."""
        self.flush()
        if self._open:
            log.warning("%d series ended incomplete and were not committed", len(self._open))
