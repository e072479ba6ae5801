"""A verbatim copy of ``pdd_batch/runs/state.py`` at commit 758f64a (run state version 2:
``_state/state.json`` and one merged ``slices/slices.parquet``), kept so tests can write run
folders exactly as the earlier version did and check that they are read and migrated.

Incremental and resumable bookkeeping of a run folder (``OUT/_state/state.json``).

Readers only ever see *published* results: ``slices/slices.parquet`` (one file),
``studies/studies.parquet``, ``errors/errors.parquet`` and ``manifest.json``. A run writes its
rows as part files into a hidden store, ``_state/parts/``, which no reader looks at; the order of
a commit is: part file written and renamed into the store (durable), *then* the state is rewritten
atomically naming it. At the end of the run ``publish`` merges the published file and the store
into a new file (streamed, a temp name in ``slices/``) and renames it over ``slices.parquet``. So:

* a series is only ever recorded as done once all of its rows are on disk;
* a crash between the two steps of a commit leaves an orphan part that no state names;
  ``reconcile`` deletes it when the next run starts, and that run screens those series again;
* readers never see a part, nor a merged file beside its parts: ``slices/`` changes by one rename;
* a series' record names where its rows are (a store part, or ``slices.parquet``) and ``publish``
  keeps only those rows, so a crash between the rename and the state update, a series screened
  again (changed files) or ``forget`` never duplicates a row;
* ``--force`` or a different checkpoint hash (``bind_model``) drops every record but deletes no
  published file: the earlier results stay readable until this run publishes, and a killed run
  leaves them in place (the next run resumes the new generation);
* a changed threshold (recalibration keeps the checkpoint hash) re-flags every row at ``publish``.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import shutil
from collections import defaultdict
from collections.abc import Collection, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pdd_batch.runs.schema import SLICES_SCHEMA
from pdd_batch.runs.writer import (
    PRIVATE_FILE_MODE,
    ensure_private_dir,
    make_private,
    remove_temp_files,
    write_json_atomic,
    write_tables_atomic,
)

log = logging.getLogger(__name__)

STATE_VERSION = 2
STATE_DIR = "_state"
STATE_FILE = "state.json"
STORE_DIR = "parts"  # inside _state/: committed parts not yet published
LOCK_FILE = "run.lock"
TABLE_DIRS = ("slices", "studies", "errors")
PUBLISHED_FILE = "slices.parquet"  # the one file readers see in slices/
MANIFEST_FILE = "manifest.json"


class RunStateError(RuntimeError):
    """A state file that cannot be read or does not match the run folder."""


class RunLockedError(RunStateError):
    """Another run is writing to the same run folder."""


def make_run_folder_private(out_dir: Path) -> None:
    """The run folder, its own subfolders and their files: 0700 / 0600 (any umask, any age)."""
    out_dir = Path(out_dir)
    ensure_private_dir(out_dir)
    make_private(out_dir)
    folders = [out_dir / d for d in (*TABLE_DIRS, STATE_DIR)] + [out_dir / STATE_DIR / STORE_DIR]
    for folder in folders:
        if folder.is_dir() and not folder.is_symlink():
            make_private(folder)
            for p in folder.iterdir():
                if p.is_file() and not p.is_symlink():
                    make_private(p)
    if (out_dir / MANIFEST_FILE).is_file():
        make_private(out_dir / MANIFEST_FILE)


@contextmanager
def run_lock(out_dir: Path) -> Iterator[None]:
    """Hold an exclusive lock on a run folder (released by the OS even if the process is killed)."""
    path = Path(out_dir) / STATE_DIR / LOCK_FILE
    ensure_private_dir(path.parent)
    fd = os.open(path, os.O_CREAT | os.O_RDWR, PRIVATE_FILE_MODE)
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
        part: where its rows are: a part of the store, ``PUBLISHED_FILE``, or "" (no rows).
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


def conform_slices(table: pa.Table) -> pa.Table:
    """``table`` with exactly ``SLICES_SCHEMA`` (absent nullable columns become nulls)."""
    columns = []
    for f in SLICES_SCHEMA:
        if f.name in table.column_names:
            columns.append(table.column(f.name).cast(f.type))
        elif f.nullable:
            columns.append(pa.nulls(table.num_rows, type=f.type))
        else:
            raise RunStateError(
                f"earlier rows lack the column {f.name!r}: rescreen with --force to rewrite them"
            )
    return pa.Table.from_arrays(columns, schema=SLICES_SCHEMA)


class RunState:
    """The committed contents of a run folder; mutate only through the methods below."""

    def __init__(self, out_dir: Path, data: Mapping[str, Any] | None = None) -> None:
        data = dict(data or {})
        self.out_dir = Path(out_dir)
        self.checkpoint_hash: str | None = data.get("checkpoint_hash")
        self.model_id: str | None = data.get("model_id")
        # The threshold the rows are flagged with (recalibration keeps the hash).
        self.threshold: float | None = data.get("threshold")
        self._threshold_bound = "threshold" in data
        self.parts: list[str] = list(data.get("parts", []))
        self.series: dict[str, SeriesRecord] = {
            k: SeriesRecord.from_dict(v) for k, v in data.get("series", {}).items()
        }
        # What slices/ holds now: {run_id, model_id, checkpoint_hash, n_series, n_slices}.
        self.published: dict[str, Any] | None = data.get("published")
        # Why the published rows are being replaced (--force / new checkpoint), until publish.
        self.replacing: str | None = data.get("replacing")
        self.stale = bool(data.get("stale", False))  # records changed since the last publish
        self._legacy = data.get("version") == 1  # parts still in slices/ (before version 2)

    @property
    def slices_dir(self) -> Path:
        return self.out_dir / "slices"

    @property
    def store_dir(self) -> Path:
        return self.out_dir / STATE_DIR / STORE_DIR

    @property
    def published_path(self) -> Path:
        return self.slices_dir / PUBLISHED_FILE

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
        if data.get("version") not in (1, STATE_VERSION):
            raise RunStateError(
                f"{STATE_DIR}/{STATE_FILE}: version {data.get('version')!r}, "
                f"expected {STATE_VERSION}"
            )
        return cls(out_dir, data)

    def to_dict(self) -> dict[str, Any]:
        out = {
            "version": 1 if self._legacy else STATE_VERSION,
            "checkpoint_hash": self.checkpoint_hash,
            "model_id": self.model_id,
            "parts": self.parts,
            "series": {k: asdict(v) for k, v in sorted(self.series.items())},
            "published": self.published,
            "replacing": self.replacing,
            "stale": self.stale,
        }
        if self._threshold_bound:  # absent: rows flagged with an unknown threshold
            out["threshold"] = self.threshold
        return out

    def save(self) -> None:
        """Rewrite the state atomically."""
        write_json_atomic(self.to_dict(), self.path)

    def _part_path(self, source: str) -> Path:
        return self.published_path if source == PUBLISHED_FILE else self.store_dir / source

    def reconcile(self) -> list[str]:
        """Delete temp files and store parts that no state names; forget series whose rows are
        gone (they are screened again). Returns the orphan parts removed."""
        folders = [self.out_dir / d for d in TABLE_DIRS] + [self.path.parent, self.store_dir]
        remove_temp_files(folders)
        if self._legacy:
            self._migrate_legacy()
        on_disk = {p.name for p in self.store_dir.glob("*.parquet")}
        orphans = sorted(on_disk - set(self.parts))
        for name in orphans:
            (self.store_dir / name).unlink(missing_ok=True)
        gone = {p for p in self.parts if p not in on_disk}
        if not self.published_path.is_file():
            gone.add(PUBLISHED_FILE)
        lost = [k for k, r in self.series.items() if r.part in gone]
        if lost or gone & set(self.parts):
            # Someone deleted committed rows: forget their series so they are screened again.
            for k in lost:
                del self.series[k]
            self.parts = [p for p in self.parts if p not in gone]
            self.stale = True
            self.save()
            log.warning("committed rows were missing; %d series will be rescreened", len(lost))
        if orphans:
            log.info("removed %d uncommitted part files of an interrupted run", len(orphans))
        return orphans

    def _migrate_legacy(self) -> None:
        """A version-1 folder kept its parts in ``slices/``: link them into the store (the
        originals stay readable until the next ``publish`` replaces them)."""
        ensure_private_dir(self.store_dir)
        for name in self.parts:
            src, dst = self.slices_dir / name, self.store_dir / name
            if src.is_file() and not dst.exists():
                try:
                    os.link(src, dst)
                except OSError:
                    shutil.copyfile(src, dst)
                make_private(dst)
        rows = sum(r.n_slices for r in self.series.values())
        self.published = {"model_id": self.model_id, "n_series": len(self.series), "n_slices": rows}
        self._legacy, self.stale = False, True
        self.save()

    def bind_model(
        self, checkpoint_hash: str, model_id: str, *, force: bool, reason: str | None = None
    ) -> int:
        """Tie the folder to a model; a different hash or ``force`` drops every earlier record
        (and unpublished part) but leaves the published results in place until ``publish``.

        Args:
            checkpoint_hash: the model's hash.
            model_id: the model's id.
            force: replace every earlier row.
            reason: why, for the warning (default: "--force" or "a different checkpoint").

        Returns:
            how many earlier series were dropped.
        """
        dropped = 0
        if force or (self.checkpoint_hash not in (None, checkpoint_hash)):
            dropped = len(self.series)
            for name in self.parts:
                (self.store_dir / name).unlink(missing_ok=True)
            self.parts, self.series = [], {}
            if dropped or self.published or self.replacing:
                self.replacing = reason or ("--force" if force else "a different checkpoint")
            self.stale = True
            if dropped:
                log.info("replacing %d earlier series (%s)", dropped, self.replacing)
        self.checkpoint_hash, self.model_id = checkpoint_hash, model_id
        self.save()
        return dropped

    def replacement_warning(self) -> str | None:
        """What this run will replace, for the user (no identifiers): None when nothing."""
        if not self.replacing:
            return None
        pub = self.published or {}
        what = "the results now in this folder"
        if pub.get("n_series") is not None:
            what += (
                f" ({pub['n_series']} series, {pub.get('n_slices', 0)} slices, "
                f"model {pub.get('model_id') or 'unknown'})"
            )
        return (
            f"{self.replacing}: {what} stay readable while this run works and are replaced "
            "by its results only when it completes"
        )

    def bind_threshold(self, threshold: float | None) -> int:
        """Record the model's threshold; when it changed (a recalibration keeps the checkpoint
        hash, so earlier rows are reused) every row is re-flagged (``threshold``,
        ``flagged = score > threshold``) when the run publishes.

        Returns:
            how many committed slices will be re-flagged.
        """
        if self._threshold_bound and self.threshold == threshold:
            return 0
        n = sum(r.n_slices for r in self.series.values())
        self.threshold, self._threshold_bound = threshold, True
        self.stale = self.stale or n > 0
        self.save()
        if n:
            log.info("%d committed slices will be re-flagged for a changed threshold", n)
        return n

    def is_done(self, series_key: str, fingerprint: str) -> bool:
        """Whether a series was screened by the bound model from the same files."""
        rec = self.series.get(series_key)
        return rec is not None and rec.fingerprint == fingerprint

    def commit_part(self, part: str, records: Mapping[str, SeriesRecord]) -> None:
        """Record a part that is already durable in the store and the series it completes."""
        if not (self.store_dir / part).is_file():
            raise RunStateError(f"{STORE_DIR}/{part}: cannot commit a part that is not on disk")
        if part not in self.parts:
            self.parts.append(part)
        self.series.update(records)
        self.save()

    def commit_empty(self, records: Mapping[str, SeriesRecord]) -> None:
        """Record series that gave no rows (``part`` is empty) as done."""
        self.series.update(records)
        self.save()

    def part_rows(self) -> dict[str, int]:
        """Rows per file holding committed rows (store parts and the published file)."""
        rows: dict[str, int] = defaultdict(int)
        for rec in self.series.values():
            if rec.part:
                rows[rec.part] += rec.n_slices
        return dict(rows)

    def forget(self, series_keys: Collection[str]) -> int:
        """Drop the records of some series (changed inputs); ``publish`` leaves out their rows.

        Returns:
            how many records were dropped.
        """
        keys = set(series_keys) & set(self.series)
        for k in keys:
            del self.series[k]
        if keys:
            self.stale = True
            self.save()
        return len(keys)

    def _reflag(self, table: pa.Table) -> pa.Table:
        if not self._threshold_bound:
            return table
        n, thr = table.num_rows, self.threshold
        if thr is None:
            flagged = pa.array([False] * n, type=pa.bool_())
        else:
            flagged = pc.greater(pc.cast(table["score"], pa.float64()), thr)
            if "out_of_distribution" in table.column_names:  # never flag those
                ood = pc.fill_null(table["out_of_distribution"], False)
                flagged = pc.and_(flagged, pc.invert(ood))
        threshold = pa.array([thr] * n, type=SLICES_SCHEMA.field("threshold").type)
        table = table.set_column(
            table.schema.get_field_index("threshold"), SLICES_SCHEMA.field("threshold"), threshold
        )
        i = table.schema.get_field_index("flagged")
        return table.set_column(i, SLICES_SCHEMA.field("flagged"), flagged)

    def _published_tables(self) -> Iterator[pa.Table]:
        """Every committed row, source by source and row group by row group, each kept only
        where its series' record names that source."""
        keep: dict[str, list[str]] = defaultdict(list)
        for k, rec in self.series.items():
            if rec.part:
                keep[rec.part].append(k)
        for source in [PUBLISHED_FILE, *self.parts]:
            if not keep.get(source):
                continue
            wanted = pa.array(sorted(keep[source]), type=pa.string())
            pf = pq.ParquetFile(self._part_path(source))
            for i in range(pf.num_row_groups):
                table = conform_slices(pf.read_row_group(i))
                table = table.filter(pc.is_in(table["series_key"], value_set=wanted))
                if table.num_rows:
                    yield self._reflag(table)

    def needs_publish(self) -> bool:
        """Whether ``slices/`` differs from the committed rows."""
        legacy = [p for p in self.slices_dir.glob("*.parquet") if p.name != PUBLISHED_FILE]
        return bool(self.parts or self.stale or self.replacing or legacy) or (
            not self.published_path.is_file() and self.published is None
        )

    def publish(self, run_id: str) -> int:
        """Swap the committed rows into ``slices/slices.parquet`` (merged into a new file, then
        one rename); then the store parts are deleted. Returns the rows published."""
        if not self.needs_publish():
            return int((self.published or {}).get("n_slices", 0))
        rows = write_tables_atomic(SLICES_SCHEMA, self._published_tables(), self.published_path)
        for k, rec in list(self.series.items()):
            if rec.part:
                self.series[k] = replace(rec, part=PUBLISHED_FILE)
        merged, self.parts = self.parts, []
        self.published = {
            "run_id": run_id,
            "model_id": self.model_id,
            "checkpoint_hash": self.checkpoint_hash,
            "n_series": len(self.series),
            "n_slices": rows,
        }
        self.replacing, self.stale = None, False
        self.save()
        for name in merged:
            (self.store_dir / name).unlink(missing_ok=True)
        for p in self.slices_dir.glob("*.parquet"):  # parts of a version-1 folder
            if p.name != PUBLISHED_FILE:
                p.unlink(missing_ok=True)
        return rows
