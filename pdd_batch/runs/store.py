"""The run store: one SQLite database in WAL mode, ``OUT/_state/run.db`` (standard library).

It holds what a run folder has committed: the bound model (``meta``), one row per screened
series (``series``), every Parquet file of the results with its table and state (``files``:
``pending`` in the hidden store, ``live`` in the published dataset, ``retired`` until deleted),
the study of each published rollup row (``studies``), the studies whose rollup must be redone
(``dirty_studies``) and the discovery file index (``file_index``, ``index_series``). A commit is
one transaction that touches only the rows it changes, so its cost does not grow with the
number of series already recorded (see docs/architecture.md for why SQLite).

No path, UID or name is stored: series, studies and files are named by keyed digests.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from pdd_batch.runs.writer import ensure_private_dir, make_private

DB_FILE = "run.db"
STORE_VERSION = 3  # 1 and 2 were _state/state.json

SCHEMA_SQL = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS series (
    series_key TEXT PRIMARY KEY,
    part TEXT NOT NULL,
    heatmap_part TEXT NOT NULL,
    n_slices INTEGER NOT NULL,
    fingerprint TEXT NOT NULL,
    study_key TEXT NOT NULL,
    dropped TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS series_by_study ON series(study_key);
CREATE INDEX IF NOT EXISTS series_by_part ON series(part);
CREATE INDEX IF NOT EXISTS series_by_heatmap_part ON series(heatmap_part);
CREATE TABLE IF NOT EXISTS files (
    name TEXT NOT NULL,
    tbl TEXT NOT NULL,
    state TEXT NOT NULL,
    n_rows INTEGER NOT NULL,
    live_rows INTEGER NOT NULL,
    PRIMARY KEY (tbl, name)
);
CREATE INDEX IF NOT EXISTS files_by_state ON files(state, tbl);
CREATE TABLE IF NOT EXISTS studies (study_key TEXT PRIMARY KEY, file TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS studies_by_file ON studies(file);
CREATE TABLE IF NOT EXISTS dirty_studies (study_key TEXT PRIMARY KEY);
CREATE TABLE IF NOT EXISTS file_index (
    file_key TEXT PRIMARY KEY,
    size INTEGER NOT NULL,
    mtime_ns INTEGER NOT NULL,
    status TEXT NOT NULL,
    reason TEXT NOT NULL,
    series_key TEXT,
    token TEXT,
    position INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS file_index_by_series ON file_index(series_key);
CREATE TABLE IF NOT EXISTS index_series (series_key TEXT PRIMARY KEY, ref TEXT NOT NULL);
"""


class StoreError(RuntimeError):
    """The run store cannot be opened or is of an unknown version."""


def connect(path: Path) -> sqlite3.Connection:
    """Open (creating) the store at ``path``: WAL journal, ``synchronous=NORMAL`` (a commit is
    atomic and survives a killed process; a power cut may lose the last commits, never the
    database's consistency), private file modes."""
    ensure_private_dir(path.parent)
    try:
        conn = sqlite3.connect(path, isolation_level=None, timeout=30.0)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=NORMAL")
        conn.execute("PRAGMA foreign_keys=OFF")
        conn.executescript(SCHEMA_SQL)
    except sqlite3.Error as exc:
        raise StoreError(f"_state/{path.name}: cannot open the run store ({exc})") from exc
    for p in path.parent.glob(path.name + "*"):  # the database, its -wal and -shm files
        make_private(p)
    version = get_meta(conn, "version")
    if version is not None and version != STORE_VERSION:
        raise StoreError(f"_state/{path.name}: version {version!r}, expected {STORE_VERSION}")
    return conn


@contextmanager
def transaction(conn: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """One atomic write transaction (``BEGIN IMMEDIATE`` ... ``COMMIT``; rolled back on error)."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield conn
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


def get_meta(conn: sqlite3.Connection, key: str, default: Any = None) -> Any:
    """A JSON value of ``meta`` (``default`` when absent)."""
    row = conn.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
    return default if row is None else json.loads(row[0])


def has_meta(conn: sqlite3.Connection, key: str) -> bool:
    """Whether ``meta`` holds ``key``."""
    return conn.execute("SELECT 1 FROM meta WHERE key = ?", (key,)).fetchone() is not None


def set_meta(conn: sqlite3.Connection, **values: Any) -> None:
    """Upsert JSON values into ``meta`` (inside the caller's transaction, if any)."""
    conn.executemany(
        "INSERT INTO meta(key, value) VALUES (?, ?) "
        "ON CONFLICT(key) DO UPDATE SET value = excluded.value",
        [(k, json.dumps(v, sort_keys=True)) for k, v in values.items()],
    )


def files_in_state(conn: sqlite3.Connection, state: str, tbl: str | None = None) -> list[str]:
    """Names of the files in ``state`` (of one table, or all), oldest first."""
    if tbl is None:
        rows = conn.execute("SELECT name FROM files WHERE state = ? ORDER BY rowid", (state,))
    else:
        rows = conn.execute(
            "SELECT name FROM files WHERE state = ? AND tbl = ? ORDER BY rowid", (state, tbl)
        )
    return [r[0] for r in rows]
