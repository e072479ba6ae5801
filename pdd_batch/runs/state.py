"""Incremental and resumable bookkeeping of a run folder (the run store ``OUT/_state/run.db``).

Results are an append-only Parquet dataset: ``slices/`` (scores, no image bytes), ``heatmaps/``
(the PNG heatmaps, by ``slice_key``), ``studies/`` and ``errors/``. A run never rewrites a
published file: it adds files, and the run store records which files are *live*; readers get
exactly the live rows from ``live_files.json`` (``pdd_batch.runs.live``), written atomically
after each publish. The order of a commit is: part files written and renamed into the hidden
store ``_state/parts/`` (durable), *then* one SQLite transaction records them and the series
they complete. At the end of the run ``publish`` makes the committed parts live (renamed into
``slices/`` and ``heatmaps/``). So:

* a series is only ever recorded as done once all of its rows are on disk, and a commit touches
  only the series it completes (its cost does not grow with the series already recorded);
* a crash between the two steps of a commit leaves an orphan part that the store does not name;
  ``reconcile`` deletes it when the next run starts, and that run screens those series again;
* readers never see a part that is not live: ``live_files.json`` changes by one rename, and a
  file stops being live before it is deleted;
* a series' record names the file holding its rows and every file counts its live rows: rows
  of a series screened again, forgotten, of an older generation or re-flagged are superseded by
  writing a *new* file of the rows that stay (copy-on-write) and retiring the old one;
* ``--force`` or a different checkpoint hash (``bind_model``) drops every record but deletes no
  published file: the earlier results stay live until this run publishes, and a killed run
  leaves them in place (the next run resumes the new generation);
* a changed threshold (recalibration keeps the checkpoint hash) re-flags every row at
  ``publish`` (new slices files; heatmaps are kept).

Run folders of earlier versions (``_state/state.json``) are migrated once (``legacy``).
"""

from __future__ import annotations

import fcntl
import logging
import os
import sqlite3
from collections.abc import Collection, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pdd_batch.runs import live, store
from pdd_batch.runs.legacy import migrate_state_json
from pdd_batch.runs.records import RunStateError, SeriesRecord, conform_slices
from pdd_batch.runs.schema import HEATMAP_COLUMNS, SLICES_SCHEMA
from pdd_batch.runs.writer import (
    PRIVATE_FILE_MODE,
    ensure_private_dir,
    make_private,
    write_table_atomic,
)

__all__ = [
    "RunLockedError",
    "RunState",
    "RunStateError",
    "SeriesRecord",
    "conform_slices",
    "make_run_folder_private",
    "run_lock",
]

log = logging.getLogger(__name__)

STATE_DIR = "_state"
LEGACY_STATE_FILE = "state.json"
STORE_DIR = "parts"  # inside _state/: committed slices parts not yet published
HEATMAP_STORE_DIR = "heatmap_parts"  # inside _state/: their heatmaps
LOCK_FILE = "run.lock"
TABLE_DIRS = ("slices", "heatmaps", "studies", "errors")


class RunLockedError(RunStateError):
    """Another run is writing to the same run folder."""


def make_run_folder_private(out_dir: Path) -> None:
    """The run folder, its own subfolders and their files: 0700 / 0600 (any umask, any age)."""
    out_dir = Path(out_dir)
    ensure_private_dir(out_dir)
    make_private(out_dir)
    state = out_dir / STATE_DIR
    folders = [out_dir / d for d in TABLE_DIRS] + [state, state / STORE_DIR]
    for folder in [*folders, state / HEATMAP_STORE_DIR]:
        if folder.is_dir() and not folder.is_symlink():
            make_private(folder)
            for p in folder.iterdir():
                if p.is_file() and not p.is_symlink():
                    make_private(p)
    for name in ("manifest.json", live.LIVE_FILE):
        if (out_dir / name).is_file():
            make_private(out_dir / name)


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


def _record(row: tuple) -> SeriesRecord:
    part, n, fp, study, dropped = row
    return SeriesRecord.from_dict(
        {"part": part, "n_slices": n, "fingerprint": fp, "study_key": study, "dropped": dropped}
    )


class SeriesTable(Mapping[str, SeriesRecord]):
    """The ``series`` rows of the store as a read-only mapping (one indexed query per lookup)."""

    _COLS = "part, n_slices, fingerprint, study_key, dropped"

    def __init__(self, state: RunState) -> None:
        self._state = state

    def __getitem__(self, key: str) -> SeriesRecord:
        row = self._state.conn.execute(
            f"SELECT {self._COLS} FROM series WHERE series_key = ?", (key,)
        ).fetchone()
        if row is None:
            raise KeyError(key)
        return _record(row)

    def __contains__(self, key: object) -> bool:
        q = "SELECT 1 FROM series WHERE series_key = ?"
        return self._state.conn.execute(q, (key,)).fetchone() is not None

    def __iter__(self) -> Iterator[str]:
        return (r[0] for r in self._state.conn.execute("SELECT series_key FROM series"))

    def __len__(self) -> int:
        return int(self._state.conn.execute("SELECT COUNT(*) FROM series").fetchone()[0])

    def __setitem__(self, key: str, record: SeriesRecord) -> None:
        """Record one series whose rows are in no file (tests and tools; runs commit parts)."""
        self._state.commit_empty({key: record})


class RunState:
    """The committed contents of a run folder; mutate only through the methods below."""

    def __init__(self, out_dir: Path, conn: sqlite3.Connection | None = None) -> None:
        self.out_dir = Path(out_dir)
        self._conn = conn
        self.series = SeriesTable(self)

    # --- locations -------------------------------------------------------------------------
    @property
    def conn(self) -> sqlite3.Connection:
        if self._conn is None:
            self._conn = store.connect(self.path)
            if not store.has_meta(self._conn, "version"):
                store.set_meta(self._conn, version=store.STORE_VERSION)
        return self._conn

    @property
    def path(self) -> Path:
        return self.out_dir / STATE_DIR / store.DB_FILE

    @property
    def slices_dir(self) -> Path:
        return self.out_dir / "slices"

    @property
    def store_dir(self) -> Path:
        return self.out_dir / STATE_DIR / STORE_DIR

    @property
    def heatmap_store_dir(self) -> Path:
        return self.out_dir / STATE_DIR / HEATMAP_STORE_DIR

    @property
    def published_path(self) -> Path:
        """The published slices dataset (a folder of live Parquet files)."""
        return self.slices_dir

    def file_path(self, tbl: str, name: str, state: str) -> Path:
        """Where a file of ``tbl`` in ``state`` (pending | live | retired) is."""
        if state == "pending":
            return (self.heatmap_store_dir if tbl == "heatmaps" else self.store_dir) / name
        return self.out_dir / tbl / name

    # --- meta ------------------------------------------------------------------------------
    def _meta(self, key: str, default: Any = None) -> Any:
        return store.get_meta(self.conn, key, default)

    @property
    def checkpoint_hash(self) -> str | None:
        return self._meta("checkpoint_hash")

    @property
    def model_id(self) -> str | None:
        return self._meta("model_id")

    @property
    def threshold(self) -> float | None:
        return self._meta("threshold")

    @property
    def published(self) -> dict[str, Any] | None:
        """What the live files hold: {run_id, model_id, checkpoint_hash, n_series, n_slices}."""
        return self._meta("published")

    @property
    def replacing(self) -> str | None:
        """Why the live rows are being replaced (--force / new checkpoint), until publish."""
        return self._meta("replacing")

    @property
    def parts(self) -> list[str]:
        """Committed slices parts not yet published."""
        return store.files_in_state(self.conn, "pending", "slices")

    @classmethod
    def load(cls, out_dir: Path) -> RunState:
        """The state of ``out_dir`` (empty when the folder has none yet); a folder written by
        an earlier version (``_state/state.json``) is migrated into the run store once."""
        out_dir = Path(out_dir)
        state = cls(out_dir)
        legacy_file = out_dir / STATE_DIR / LEGACY_STATE_FILE
        if not state.path.exists() and not legacy_file.is_file():
            return state
        state._conn = store.connect(state.path)
        if not store.has_meta(state._conn, "version"):
            if legacy_file.is_file():
                migrate_state_json(state, legacy_file)
            else:
                store.set_meta(state._conn, version=store.STORE_VERSION)
        return state

    def close(self) -> None:
        """Close the database connection (a later use reopens it)."""
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    # --- recovery --------------------------------------------------------------------------
    def reconcile(self) -> list[str]:
        """Finish or undo what an interrupted run left: see ``live.reconcile``. Returns the
        orphan parts removed."""
        return live.reconcile(self)

    # --- binding ---------------------------------------------------------------------------
    def bind_model(
        self, checkpoint_hash: str, model_id: str, *, force: bool, reason: str | None = None
    ) -> int:
        """Tie the folder to a model; a different hash or ``force`` drops every earlier record
        (and unpublished part) but leaves the published results in place until ``publish``.

        Returns:
            how many earlier series were dropped.
        """
        dropped = 0
        replace = force or (self.checkpoint_hash not in (None, checkpoint_hash))
        with store.transaction(self.conn) as c:
            if replace:
                dropped = len(self.series)
                pending = c.execute("SELECT tbl, name FROM files WHERE state = 'pending'")
                pending = pending.fetchall()
                c.execute("DELETE FROM files WHERE state = 'pending'")
                c.execute("UPDATE files SET live_rows = 0")
                c.execute("DELETE FROM series")
                c.execute("INSERT OR IGNORE INTO dirty_studies SELECT study_key FROM studies")
                if dropped or self.published or self.replacing:
                    why = reason or ("--force" if force else "a different checkpoint")
                    store.set_meta(c, replacing=why)
                if dropped:
                    log.info("replacing %d earlier series (%s)", dropped, self.replacing)
            store.set_meta(c, checkpoint_hash=checkpoint_hash, model_id=model_id)
        if replace:
            for tbl, name in pending:  # a crash before this: orphans, removed by reconcile
                self.file_path(tbl, name, "pending").unlink(missing_ok=True)
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
        if store.has_meta(self.conn, "threshold") and self.threshold == threshold:
            return 0
        n = self.committed_rows()
        with store.transaction(self.conn) as c:
            store.set_meta(c, threshold=threshold, reflag=bool(self._meta("reflag")) or n > 0)
            if n:
                c.execute("INSERT OR IGNORE INTO dirty_studies SELECT study_key FROM studies")
                c.execute("INSERT OR IGNORE INTO dirty_studies SELECT study_key FROM series")
        if n:
            log.info("%d committed slices will be re-flagged for a changed threshold", n)
        return n

    # --- commits ---------------------------------------------------------------------------
    def is_done(self, series_key: str, fingerprint: str) -> bool:
        """Whether a series was screened by the bound model from the same files."""
        rec = self.series.get(series_key)
        return rec is not None and rec.fingerprint == fingerprint

    def write_part(self, part: str, table: pa.Table) -> None:
        """Write a part (``SLICES_SCHEMA`` rows) durably into the store: the scores in
        ``parts/``, the heatmaps in ``heatmap_parts/``; ``commit_part`` records it."""
        table = conform_slices(table)
        write_table_atomic(table.select(HEATMAP_COLUMNS), self.heatmap_store_dir / part)
        scores = [c for c in table.column_names if c != "heatmap_png"]
        write_table_atomic(table.select(scores), self.store_dir / part)

    def _split_full_part(self, part: str) -> None:
        """A part written whole into ``parts/`` (with its heatmaps): split it as ``write_part``."""
        path = self.store_dir / part
        if "heatmap_png" in pq.read_schema(path).names:
            self.write_part(part, pq.read_table(path))

    def commit_part(self, part: str, records: Mapping[str, SeriesRecord]) -> None:
        """Record a part that is already durable in the store and the series it completes."""
        if not (self.store_dir / part).is_file():
            raise RunStateError(f"{STORE_DIR}/{part}: cannot commit a part that is not on disk")
        if not (self.heatmap_store_dir / part).is_file():
            self._split_full_part(part)
        n = sum(r.n_slices for r in records.values() if r.part == part)
        with store.transaction(self.conn) as c:
            for tbl in ("slices", "heatmaps"):
                c.execute(
                    "INSERT OR REPLACE INTO files(name, tbl, state, n_rows, live_rows) "
                    "VALUES (?, ?, 'pending', ?, 0)",
                    (part, tbl, n),
                )
            self._put(c, records)

    def commit_empty(self, records: Mapping[str, SeriesRecord]) -> None:
        """Record series that gave no rows (``part`` is empty) as done."""
        with store.transaction(self.conn) as c:
            self._put(c, records)

    def _put(self, c: sqlite3.Connection, records: Mapping[str, SeriesRecord]) -> None:
        """Replace the records of ``records``' series (their earlier rows become dead)."""
        self._drop(c, list(records))
        rows = [
            (k, r.part, r.part, r.n_slices, r.fingerprint, r.study_key, r.dropped_json())
            for k, r in records.items()
        ]
        c.executemany(
            "INSERT INTO series(series_key, part, heatmap_part, n_slices, fingerprint, "
            "study_key, dropped) VALUES (?, ?, ?, ?, ?, ?, ?)",
            rows,
        )
        for tbl in ("slices", "heatmaps"):
            c.executemany(
                "UPDATE files SET live_rows = live_rows + ? WHERE tbl = ? AND name = ?",
                [(r[3], tbl, r[1]) for r in rows if r[1]],
            )
        c.executemany("INSERT OR IGNORE INTO dirty_studies VALUES (?)", [(r[5],) for r in rows])

    def _drop(self, c: sqlite3.Connection, keys: list[str]) -> int:
        """Delete the records of ``keys``; their files' live row counts go down."""
        dropped = 0
        for key in keys:
            row = c.execute(
                "SELECT part, heatmap_part, n_slices, study_key FROM series WHERE series_key = ?",
                (key,),
            ).fetchone()
            if row is None:
                continue
            part, heat, n, study = row
            if part:
                c.execute(
                    "UPDATE files SET live_rows = live_rows - ? WHERE tbl = 'slices' AND name = ?",
                    (n, part),
                )
                c.execute(
                    "UPDATE files SET live_rows = live_rows - ? "
                    "WHERE tbl = 'heatmaps' AND name = ?",
                    (n, heat),
                )
            c.execute("DELETE FROM series WHERE series_key = ?", (key,))
            c.execute("INSERT OR IGNORE INTO dirty_studies VALUES (?)", (study,))
            dropped += 1
        return dropped

    def forget(self, series_keys: Collection[str]) -> int:
        """Drop the records of some series (changed inputs); ``publish`` leaves out their rows.

        Returns:
            how many records were dropped.
        """
        with store.transaction(self.conn) as c:
            return self._drop(c, sorted(set(series_keys)))

    def committed_rows(self) -> int:
        """Rows of every committed series (published or not)."""
        q = "SELECT COALESCE(SUM(live_rows), 0) FROM files WHERE tbl = 'slices' AND state != ?"
        return int(self.conn.execute(q, ("retired",)).fetchone()[0])

    def part_rows(self) -> dict[str, int]:
        """Live rows per file holding committed rows (store parts and published files)."""
        rows = self.conn.execute(
            "SELECT name, live_rows FROM files WHERE tbl = 'slices' AND state != 'retired' "
            "AND live_rows > 0"
        )
        return dict(rows.fetchall())

    # --- publishing (pdd_batch.runs.live) --------------------------------------------------
    def needs_publish(self) -> bool:
        """Whether the live files differ from the committed rows."""
        return live.needs_publish(self)

    def publish(self, run_id: str) -> int:
        """Make the committed rows live (see ``live.publish``); returns the live slice rows."""
        return live.publish(self, run_id)

    def reflag(self, table: pa.Table) -> pa.Table:
        """``table`` flagged with the bound threshold (out-of-distribution rows never)."""
        if not store.has_meta(self.conn, "threshold"):
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
