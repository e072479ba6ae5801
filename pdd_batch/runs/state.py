"""Incremental and resumable bookkeeping of a run folder (``OUT/_state/state.json``).

The state lists the committed ``slices/`` part files and, per series, which part holds its rows,
how many slices it gave, a fingerprint of its input files and the files it dropped. The order of
a commit is: part file written and renamed into ``slices/`` (durable), *then* the state is
rewritten atomically naming it. So:

* a series is only ever recorded as done once all of its rows are on disk;
* a crash between the two steps leaves an orphan part that no state names; ``reconcile`` deletes
  it when the next run starts, and that run screens those series again (no gaps, no duplicates);
* a later run with the same checkpoint hash skips done series whose files are unchanged;
  a different checkpoint hash, ``--force`` or changed files replace the earlier rows;
* a changed threshold (recalibration keeps the checkpoint hash) re-flags every committed row.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
from collections import defaultdict
from collections.abc import Collection, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pdd_batch.runs.writer import read_parts, remove_temp_files, write_json_atomic, write_table_atomic

log = logging.getLogger(__name__)

STATE_VERSION = 1
STATE_DIR = "_state"
STATE_FILE = "state.json"
LOCK_FILE = "run.lock"
TABLE_DIRS = ("slices", "studies", "errors")


class RunStateError(RuntimeError):
    """A state file that cannot be read or does not match the run folder."""


class RunLockedError(RunStateError):
    """Another run is writing to the same run folder."""


@contextmanager
def run_lock(out_dir: Path) -> Iterator[None]:
    """Hold an exclusive lock on a run folder (released by the OS even if the process is killed)."""
    path = Path(out_dir) / STATE_DIR / LOCK_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as exc:
            raise RunLockedError(f"another run is writing to {Path(out_dir).name}/") from exc
        yield
    finally:
        os.close(fd)


@dataclass(frozen=True)
class SeriesRecord:
    """One screened series.

    Attributes:
        part: the ``slices/`` file holding its rows.
        n_slices: rows it contributed.
        fingerprint: digest of its input files (paths, sizes, mtimes) when it was screened.
        study_key: its study (for rollups without reading every part).
        dropped: ``[file, reason]`` for each of its files that gave no slice.
    """

    part: str
    n_slices: int
    fingerprint: str
    study_key: str
    dropped: tuple[tuple[str, str], ...] = field(default_factory=tuple)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> SeriesRecord:
        return cls(
            part=str(d["part"]),
            n_slices=int(d["n_slices"]),
            fingerprint=str(d["fingerprint"]),
            study_key=str(d["study_key"]),
            dropped=tuple((str(f), str(r)) for f, r in d.get("dropped", ())),
        )


class RunState:
    """The committed contents of a run folder; mutate only through the methods below."""

    def __init__(self, out_dir: Path, data: Mapping[str, Any] | None = None) -> None:
        data = dict(data or {})
        self.out_dir = Path(out_dir)
        self.checkpoint_hash: str | None = data.get("checkpoint_hash")
        self.model_id: str | None = data.get("model_id")
        # The threshold the committed rows were flagged with (recalibration keeps the hash).
        self.threshold: float | None = data.get("threshold")
        self._threshold_bound = "threshold" in data
        self.parts: list[str] = list(data.get("parts", []))
        self.series: dict[str, SeriesRecord] = {
            k: SeriesRecord.from_dict(v) for k, v in data.get("series", {}).items()
        }

    @property
    def slices_dir(self) -> Path:
        return self.out_dir / "slices"

    @property
    def path(self) -> Path:
        return self.out_dir / STATE_DIR / STATE_FILE

    @classmethod
    def load(cls, out_dir: Path) -> RunState:
        """The state of ``out_dir`` (empty when the folder has none yet)."""
        path = Path(out_dir) / STATE_DIR / STATE_FILE
        if not path.is_file():
            return cls(out_dir)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            raise RunStateError(f"{STATE_DIR}/{STATE_FILE}: unreadable ({exc})") from exc
        if data.get("version") != STATE_VERSION:
            raise RunStateError(
                f"{STATE_DIR}/{STATE_FILE}: version {data.get('version')!r}, "
                f"expected {STATE_VERSION}"
            )
        return cls(out_dir, data)

    def to_dict(self) -> dict[str, Any]:
        out = {
            "version": STATE_VERSION,
            "checkpoint_hash": self.checkpoint_hash,
            "model_id": self.model_id,
            "parts": self.parts,
            "series": {k: asdict(v) for k, v in sorted(self.series.items())},
        }
        if self._threshold_bound:  # absent: rows flagged with an unknown threshold
            out["threshold"] = self.threshold
        return out

    def save(self) -> None:
        """Rewrite the state atomically."""
        write_json_atomic(self.to_dict(), self.path)

    def reconcile(self) -> list[str]:
        """Delete temp files and ``slices/`` parts that no state names; returns the orphans."""
        remove_temp_files([self.out_dir / d for d in TABLE_DIRS] + [self.path.parent])
        if not self.slices_dir.is_dir():
            return []
        known = set(self.parts)
        orphans = sorted(p.name for p in self.slices_dir.glob("*.parquet") if p.name not in known)
        for name in orphans:
            (self.slices_dir / name).unlink(missing_ok=True)
        missing = sorted(known - {p.name for p in self.slices_dir.glob("*.parquet")})
        if missing:
            # Someone deleted committed parts: forget their series so they are screened again.
            lost = [k for k, r in self.series.items() if r.part in set(missing)]
            for k in lost:
                del self.series[k]
            self.parts = [p for p in self.parts if p not in set(missing)]
            self.save()
            log.warning(
                "%d committed part files were missing; %d series will be rescreened",
                len(missing),
                len(lost),
            )
        if orphans:
            log.info("removed %d uncommitted part files of an interrupted run", len(orphans))
        return orphans

    def bind_model(self, checkpoint_hash: str, model_id: str, *, force: bool) -> int:
        """Tie the folder to a model; a different hash or ``force`` drops every earlier row.

        Returns:
            how many earlier series were dropped.
        """
        dropped = 0
        if force or (self.checkpoint_hash not in (None, checkpoint_hash)):
            dropped = len(self.series)
            for name in self.parts:
                (self.slices_dir / name).unlink(missing_ok=True)
            self.parts, self.series = [], {}
            if dropped:
                log.info(
                    "replacing %d earlier series (%s)",
                    dropped,
                    "--force" if force else "different checkpoint",
                )
        self.checkpoint_hash, self.model_id = checkpoint_hash, model_id
        self.save()
        return dropped

    def bind_threshold(self, threshold: float | None) -> int:
        """Re-flag every committed row when the model's threshold changed (a recalibration keeps
        the checkpoint hash, so its earlier rows are reused): ``threshold`` and
        ``flagged = score > threshold`` are rewritten in place, part by part (each atomically).

        Returns:
            how many parts were rewritten.
        """
        if self._threshold_bound and self.threshold == threshold:
            return 0
        if self.parts and self._threshold_bound:  # a crash mid-way must not look bound
            self._threshold_bound = False
            self.save()
        for name in self.parts:
            path = self.slices_dir / name
            table = pq.read_table(path)
            n = table.num_rows
            thr_field = table.schema.field("threshold")
            if threshold is None:
                flagged = pa.array([False] * n, type=pa.bool_())
            else:
                flagged = pc.greater(pc.cast(table["score"], pa.float64()), threshold)
                if "out_of_distribution" in table.column_names:  # never flag those
                    ood = pc.fill_null(table["out_of_distribution"], False)
                    flagged = pc.and_(flagged, pc.invert(ood))
            table = table.set_column(
                table.schema.get_field_index("threshold"),
                thr_field,
                pa.array([threshold] * n, type=thr_field.type),
            )
            table = table.set_column(
                table.schema.get_field_index("flagged"), table.schema.field("flagged"), flagged
            )
            write_table_atomic(table, path)
        if self.parts:
            log.info("re-flagged %d part files for a changed threshold", len(self.parts))
        self.threshold, self._threshold_bound = threshold, True
        self.save()
        return len(self.parts)

    def is_done(self, series_key: str, fingerprint: str) -> bool:
        """Whether a series was screened by the bound model from the same files."""
        rec = self.series.get(series_key)
        return rec is not None and rec.fingerprint == fingerprint

    def commit_part(self, part: str, records: Mapping[str, SeriesRecord]) -> None:
        """Record a part that is already durable in ``slices/`` and the series it completes."""
        if not (self.slices_dir / part).is_file():
            raise RunStateError(f"slices/{part}: cannot commit a part that is not on disk")
        if part not in self.parts:
            self.parts.append(part)
        self.series.update(records)
        self.save()

    def commit_empty(self, records: Mapping[str, SeriesRecord]) -> None:
        """Record series that gave no rows (``part`` is empty) as done."""
        self.series.update(records)
        self.save()

    def part_rows(self) -> dict[str, int]:
        """Rows per committed part, from the series records."""
        rows: dict[str, int] = defaultdict(int)
        for rec in self.series.values():
            if rec.part:
                rows[rec.part] += rec.n_slices
        return {p: rows.get(p, 0) for p in self.parts}

    def forget(self, series_keys: Collection[str], new_part_name: Iterable[str]) -> int:
        """Remove the rows of some series (changed inputs), rewriting the parts that hold them.

        Args:
            series_keys: series to drop.
            new_part_name: supplies names for rewritten parts.

        Returns:
            how many parts were rewritten or deleted.
        """
        keys = set(series_keys) & set(self.series)
        affected = sorted({self.series[k].part for k in keys if self.series[k].part})
        names = iter(new_part_name)
        for part in affected:
            table = pq.read_table(self.slices_dir / part)
            keep = table.filter(pc.invert(pc.is_in(table["series_key"], pa.array(sorted(keys)))))
            idx = self.parts.index(part)
            if keep.num_rows:
                new = next(names)
                write_table_atomic(keep, self.slices_dir / new)
                self.parts[idx] = new
                for k, rec in list(self.series.items()):
                    if rec.part == part and k not in keys:
                        self.series[k] = SeriesRecord(
                            new, rec.n_slices, rec.fingerprint, rec.study_key, rec.dropped
                        )
            else:
                self.parts.pop(idx)
            for k in keys:
                if k in self.series and self.series[k].part == part:
                    del self.series[k]
            self.save()
            (self.slices_dir / part).unlink(missing_ok=True)
        for k in keys & set(self.series):
            del self.series[k]
        self.save()
        return len(affected)

    def compact(self, max_parts: int, target_rows: int, new_part_name: Iterable[str]) -> int:
        """Merge the smallest parts while there are more than ``max_parts``; returns merges made."""
        merges = 0
        names = iter(new_part_name)
        while len(self.parts) > max_parts:
            rows = self.part_rows()
            smallest = sorted(self.parts, key=lambda p: (rows[p], p))
            group, total = [], 0
            for p in smallest:
                if group and total + rows[p] > target_rows and len(group) >= 2:
                    break
                group.append(p)
                total += rows[p]
            if len(group) < 2:
                break
            merged = read_parts(self.slices_dir, group)
            new = next(names)
            write_table_atomic(merged, self.slices_dir / new)
            first = min(self.parts.index(p) for p in group)
            self.parts = [p for p in self.parts if p not in group]
            self.parts.insert(first, new)
            for k, rec in list(self.series.items()):
                if rec.part in group:
                    self.series[k] = SeriesRecord(
                        new, rec.n_slices, rec.fingerprint, rec.study_key, rec.dropped
                    )
            self.save()
            for p in group:
                (self.slices_dir / p).unlink(missing_ok=True)
            merges += 1
        return merges
