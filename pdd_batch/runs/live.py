"""The live files of a run folder: publishing, superseding, recovery and compaction.

A table (``slices``, ``heatmaps``, ``studies``, ``errors``) is the set of its *live* files in the
run store. Files are only ever added: rows that stop being current (a series screened again,
forgotten, of an older generation, re-flagged; a study rolled up again) are superseded by
writing a new file of the rows that stay and retiring the old file (copy-on-write, as table
formats do). After each change ``OUT/live_files.json`` (``LIVE_FILE``) is rewritten atomically
from the store, and only then are retired files deleted, so a reader of that list always finds
its files. ``reconcile`` finishes or undoes what a killed run left.
"""

from __future__ import annotations

import json
import logging
import os
import uuid
from collections import defaultdict
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pdd_batch.runs import store
from pdd_batch.runs.writer import remove_temp_files, write_json_atomic, write_tables_atomic

if TYPE_CHECKING:
    from pdd_batch.runs.state import RunState

log = logging.getLogger(__name__)

LIVE_FILE = "live_files.json"
LIVE_TABLES = ("slices", "heatmaps", "studies", "errors")
KEY_COLUMN = {"slices": "series_key", "heatmaps": "series_key", "studies": "study_key"}
CHUNK = 500  # SQL parameters per IN (...) query


def _chunks(items: list[str], n: int = CHUNK) -> Iterator[list[str]]:
    for i in range(0, len(items), n):
        yield items[i : i + n]


def new_name(tbl: str, run_id: str) -> str:
    """A file name no other file of the folder has."""
    return f"{tbl}-{run_id}-{uuid.uuid4().hex[:12]}.parquet"


def live_list(state: RunState) -> dict[str, Any]:
    """The content of ``live_files.json``: each table's live files, relative to the folder."""
    tables: dict[str, list[str]] = {t: [] for t in LIVE_TABLES}
    rows = state.conn.execute(
        "SELECT tbl, name FROM files WHERE state = 'live' ORDER BY tbl, rowid"
    )
    for tbl, name in rows:
        tables.setdefault(tbl, []).append(f"{tbl}/{name}")
    return {"format": "pdd-batch live files", "version": 1, "tables": tables}


def write_live_list(state: RunState) -> None:
    """Rewrite ``live_files.json`` from the store (atomic: readers see the old or the new)."""
    write_json_atomic(live_list(state), state.out_dir / LIVE_FILE)


def _unlink(state: RunState, tbl: str, name: str) -> None:
    for where in ("pending", "live"):
        state.file_path(tbl, name, where).unlink(missing_ok=True)


def delete_retired(state: RunState) -> int:
    """Delete retired files (no longer in ``live_files.json``) and forget them."""
    retired = state.conn.execute("SELECT tbl, name FROM files WHERE state = 'retired'").fetchall()
    for tbl, name in retired:
        _unlink(state, tbl, name)
    state.conn.execute("DELETE FROM files WHERE state = 'retired'")
    return len(retired)


def _keep_keys(state: RunState, tbl: str, name: str) -> list[str]:
    """The keys whose current rows are in file ``name`` of ``tbl``."""
    if tbl == "studies":
        q = "SELECT study_key FROM studies WHERE file = ? AND study_key NOT IN dirty_studies"
    else:
        col = "part" if tbl == "slices" else "heatmap_part"
        q = f"SELECT series_key FROM series WHERE {col} = ?"
    return [r[0] for r in state.conn.execute(q, (name,))]


def _rewrite(
    state: RunState, tbl: str, sources: Iterable[tuple[str, str]], run_id: str, reflag: bool
) -> tuple[str, int]:
    """Write the current rows of ``sources`` ((name, file state) pairs of ``tbl``) into one new
    live file; returns (its name, its rows)."""
    sources = list(sources)
    schema = pq.read_schema(state.file_path(tbl, sources[0][0], sources[0][1]))

    def tables() -> Iterator[pa.Table]:
        for name, where in sources:
            wanted = pa.array(sorted(_keep_keys(state, tbl, name)), type=pa.string())
            pf = pq.ParquetFile(state.file_path(tbl, name, where))
            for i in range(pf.num_row_groups):
                t = pf.read_row_group(i)
                t = t.filter(pc.is_in(t[KEY_COLUMN[tbl]], value_set=wanted))
                if reflag and tbl == "slices":
                    t = state.reflag(t)
                if t.num_rows:
                    yield t.cast(schema)

    name = new_name(tbl, run_id)
    rows = write_tables_atomic(schema, tables(), state.out_dir / tbl / name)
    return name, rows


def _swap(state: RunState, tbl: str, old: list[str], new: tuple[str, int] | None) -> None:
    """In the caller's transaction: retire ``old`` files, make ``new`` live, repoint keys."""
    c = state.conn
    col = {"slices": "part", "heatmaps": "heatmap_part"}.get(tbl)
    for name in old:
        c.execute("UPDATE files SET state = 'retired' WHERE tbl = ? AND name = ?", (tbl, name))
        if new is not None and col is not None:
            c.execute(f"UPDATE series SET {col} = ? WHERE {col} = ?", (new[0], name))
        elif new is not None and tbl == "studies":
            q = "UPDATE studies SET file = ? WHERE file = ? AND study_key NOT IN dirty_studies"
            c.execute(q, (new[0], name))
    if new is not None:
        c.execute(
            "INSERT INTO files(name, tbl, state, n_rows, live_rows) VALUES (?, ?, 'live', ?, ?)",
            (new[0], tbl, new[1], new[1]),
        )


def needs_publish(state: RunState) -> bool:
    """Whether the live files differ from the committed rows."""
    c = state.conn
    if not (state.out_dir / LIVE_FILE).is_file() or store.get_meta(c, "reflag"):
        return True
    if state.replacing or store.files_in_state(c, "pending"):
        return True
    q = "SELECT 1 FROM files WHERE state = 'live' AND tbl IN ('slices', 'heatmaps') "
    return c.execute(q + "AND live_rows < n_rows LIMIT 1").fetchone() is not None


def publish(state: RunState, run_id: str) -> int:
    """Make the committed rows live: store parts are renamed into ``slices/`` and ``heatmaps/``;
    files holding superseded rows (or every slices file, to re-flag) are replaced by new files
    of their current rows. Returns the live slice rows."""
    c = state.conn
    if needs_publish(state):
        reflag = bool(store.get_meta(c, "reflag"))
        renames, swaps = [], []
        for tbl in ("slices", "heatmaps"):
            q = "SELECT name, state, n_rows, live_rows FROM files WHERE tbl = ? AND state != ?"
            for name, where, n_rows, live_rows in c.execute(q, (tbl, "retired")).fetchall():
                redo = live_rows < n_rows or (reflag and tbl == "slices")
                if not redo:
                    if where == "pending":
                        renames.append((tbl, name))
                    continue
                new = _rewrite(state, tbl, [(name, where)], run_id, reflag) if live_rows else None
                swaps.append((tbl, [name], new))
        with store.transaction(c):
            for tbl, name in renames:
                c.execute("UPDATE files SET state = 'live' WHERE tbl = ? AND name = ?", (tbl, name))
            for tbl, old, new in swaps:
                _swap(state, tbl, old, new)
            rows = state.committed_rows()
            published = {
                "run_id": run_id,
                "model_id": state.model_id,
                "checkpoint_hash": state.checkpoint_hash,
                "n_series": len(state.series),
                "n_slices": rows,
            }
            store.set_meta(c, published=published, replacing=None, reflag=False)
        _roll_forward(state, renames)
        write_live_list(state)
        delete_retired(state)
    return state.committed_rows()


def _roll_forward(state: RunState, files: Iterable[tuple[str, str]]) -> None:
    """Move live files that are still in the store to their table folder (a publish that was
    killed after its transaction)."""
    for tbl, name in files:
        src, dst = state.file_path(tbl, name, "pending"), state.file_path(tbl, name, "live")
        if src.is_file() and not dst.is_file():
            dst.parent.mkdir(mode=0o700, exist_ok=True)
            os.replace(src, dst)


def _dirty_studies(state: RunState) -> list[str]:
    return [r[0] for r in state.conn.execute("SELECT study_key FROM dirty_studies")]


def dirty_study_slices(state: RunState, columns: list[str]) -> pa.Table:
    """The current slice rows (``columns``) of every study whose rollup must be redone."""
    by_part: dict[str, list[str]] = defaultdict(list)
    for chunk in _chunks(_dirty_studies(state)):
        q = ",".join("?" * len(chunk))
        rows = state.conn.execute(
            f"SELECT series_key, part FROM series WHERE study_key IN ({q}) AND part != ''", chunk
        )
        for key, part in rows:
            by_part[part].append(key)
    tables = []
    for part, keys in by_part.items():
        where = state.conn.execute(
            "SELECT state FROM files WHERE tbl = 'slices' AND name = ?", (part,)
        ).fetchone()
        path = state.file_path("slices", part, where[0] if where else "live")
        present = set(pq.read_schema(path).names)
        t = pq.read_table(
            path,
            columns=[c for c in columns if c in present],
            filters=pc.field("series_key").isin(keys),
        )
        for col in columns:
            if col not in present:  # rows written before the column existed
                t = t.append_column(col, pa.nulls(t.num_rows, pa.bool_()))
        tables.append(t.select(columns))
    if not tables:
        return pa.table({c: pa.array([], pa.string()) for c in columns})
    return pa.concat_tables(tables, promote_options="permissive")


def publish_studies(state: RunState, table: pa.Table, run_id: str) -> int:
    """Make ``table`` (the rollup of every dirty study) live in ``studies/``: studies files
    holding an earlier rollup of one of them are replaced by files of their other rows.
    Returns the number of live studies."""
    c = state.conn
    dirty = _dirty_studies(state)
    old_files: set[str] = set()
    for chunk in _chunks(dirty):
        q = ",".join("?" * len(chunk))
        old_files.update(
            r[0] for r in c.execute(f"SELECT file FROM studies WHERE study_key IN ({q})", chunk)
        )
    swaps = []
    for name in sorted(old_files):
        keep = _keep_keys(state, "studies", name)
        swaps.append(
            (name, _rewrite(state, "studies", [(name, "live")], run_id, False) if keep else None)
        )
    fresh = None
    if table.num_rows:
        fresh_name = new_name("studies", run_id)
        write_tables_atomic(table.schema, [table], state.out_dir / "studies" / fresh_name)
        fresh = (fresh_name, table.num_rows)
    with store.transaction(c):
        for name, new in swaps:
            _swap(state, "studies", [name], new)
        for chunk in _chunks(dirty):
            q = ",".join("?" * len(chunk))
            c.execute(f"DELETE FROM studies WHERE study_key IN ({q})", chunk)
        if fresh is not None:
            _swap(state, "studies", [], fresh)
            keys = table.column("study_key").to_pylist()
            c.executemany("INSERT INTO studies VALUES (?, ?)", [(k, fresh[0]) for k in keys])
        c.execute("DELETE FROM dirty_studies")
    write_live_list(state)
    delete_retired(state)
    return int(c.execute("SELECT COUNT(*) FROM studies").fetchone()[0])


def publish_errors(state: RunState, table: pa.Table, run_id: str) -> int:
    """Replace the live errors files by one file of ``table``; returns its rows."""
    name = new_name("errors", run_id)
    write_tables_atomic(table.schema, [table], state.out_dir / "errors" / name)
    with store.transaction(state.conn):
        old = store.files_in_state(state.conn, "live", "errors")
        _swap(state, "errors", old, (name, table.num_rows))
    write_live_list(state)
    delete_retired(state)
    return table.num_rows


def _missing(state: RunState) -> list[tuple[str, str, str]]:
    """Pending or live files that are on disk nowhere (someone deleted committed rows)."""
    rows = state.conn.execute("SELECT tbl, name, state FROM files WHERE state != 'retired'")
    return [
        (tbl, name, where)
        for tbl, name, where in rows.fetchall()
        if not state.file_path(tbl, name, where).is_file()
        and not state.file_path(tbl, name, "pending").is_file()
    ]


def _forget_missing(state: RunState, missing: list[tuple[str, str, str]]) -> int:
    """Forget the series whose rows (or heatmaps) are in a missing file: they are screened
    again. Returns how many."""
    keys: list[str] = []
    for tbl, name, _ in missing:
        if tbl in ("slices", "heatmaps"):
            keys.extend(_keep_keys(state, tbl, name))
    lost = state.forget(keys)
    with store.transaction(state.conn) as c:
        for tbl, name, _ in missing:
            c.execute("UPDATE files SET state = 'retired' WHERE tbl = ? AND name = ?", (tbl, name))
            if tbl == "studies":
                q = "INSERT OR IGNORE INTO dirty_studies SELECT study_key FROM studies WHERE file=?"
                c.execute(q, (name,))
                c.execute("DELETE FROM studies WHERE file = ?", (name,))
    return lost


def reconcile(state: RunState) -> list[str]:
    """Finish or undo what an interrupted run left: temp files and files the store does not
    name are deleted (orphan parts: their series are screened again), live files still in the
    store are moved to their folder, retired files deleted, series whose committed rows were
    deleted by someone forgotten (screened again), and ``live_files.json`` rewritten if it is
    not the store's. Returns the orphan store parts removed."""
    folders = [state.out_dir / d for d in LIVE_TABLES]
    folders += [state.path.parent, state.store_dir, state.heatmap_store_dir]
    remove_temp_files(folders)
    c = state.conn
    live = c.execute("SELECT tbl, name FROM files WHERE state = 'live'").fetchall()
    _roll_forward(state, live)
    delete_retired(state)
    missing = _missing(state)
    if missing:
        lost = _forget_missing(state, missing)
        log.warning("committed rows were missing; %d series will be rescreened", lost)
    named = {(t, n) for t, n in c.execute("SELECT tbl, name FROM files WHERE state != 'retired'")}
    orphans = []
    for tbl, folder in [("slices", state.store_dir), ("heatmaps", state.heatmap_store_dir)] + [
        (t, state.out_dir / t) for t in LIVE_TABLES
    ]:
        ours = folder in (state.store_dir, state.heatmap_store_dir)
        for p in sorted(folder.glob("*.parquet")) if folder.is_dir() else []:
            # in a table folder only names this module gives (never a file someone put there)
            mine = ours or p.name.startswith(f"{tbl}-") or p.name == "slices.parquet"
            if (tbl, p.name) not in named and mine:  # slices.parquet: a migrated folder's
                p.unlink(missing_ok=True)
                if folder == state.store_dir:
                    orphans.append(p.name)
    if orphans:
        log.info("removed %d uncommitted part files of an interrupted run", len(orphans))
    path = state.out_dir / LIVE_FILE
    try:
        current = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None
    except (OSError, ValueError):
        current = None
    if current is not None and current != live_list(state):
        write_live_list(state)
    return orphans


def _small_batches(files: list[tuple[str, int]], target_rows: int) -> list[list[str]]:
    """Consecutive small files grouped into batches of about ``target_rows`` (2+ files each)."""
    batches: list[list[str]] = []
    current: list[str] = []
    rows = 0
    for name, n in files:
        if n >= target_rows:
            continue
        if current and rows + n > target_rows:
            batches.append(current)
            current, rows = [], 0
        current.append(name)
        rows += n
    batches.append(current)
    return [b for b in batches if len(b) > 1]


def compact(state: RunState, run_id: str, target_rows: int = 1 << 20) -> dict[str, int]:
    """Merge the small live files of each table into files of about ``target_rows`` rows (an
    explicit maintenance step: ``pdd-batch compact``). The merged files are retired, never
    rewritten. Returns files merged per table."""
    merged: dict[str, int] = {}
    for tbl in ("slices", "heatmaps", "studies"):
        q = "SELECT name, live_rows FROM files WHERE tbl = ? AND state = 'live' ORDER BY rowid"
        if tbl == "studies":
            q = q.replace("live_rows", "n_rows")
        files = state.conn.execute(q, (tbl,)).fetchall()
        merged[tbl] = 0
        for batch in _small_batches(files, target_rows):
            new = _rewrite(state, tbl, [(n, "live") for n in batch], run_id, reflag=False)
            with store.transaction(state.conn):
                _swap(state, tbl, batch, new)
            merged[tbl] += len(batch)
    write_live_list(state)
    delete_retired(state)
    return merged
