"""One-time migration of a run folder written by an earlier version (``_state/state.json``).

Versions 1 and 2 kept one JSON state rewritten at every commit and one merged
``slices/slices.parquet`` (heatmaps inside) rewritten at every publish; version 1 also kept its
unpublished parts in ``slices/``. The migration splits every file holding current rows into a
slices file and a heatmaps file (the published rows become live files, the unpublished parts
stay pending in the store), records everything in the run store in one transaction, writes
``live_files.json`` and only then deletes the old files. A migration killed before its
transaction leaves the old folder as it was (its new files are orphans, named again by the
next attempt); killed after it, the leftovers are deleted by the next ``reconcile``.
"""

from __future__ import annotations

import json
import logging
from collections import defaultdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pdd_batch.runs import store
from pdd_batch.runs.live import write_live_list
from pdd_batch.runs.records import RunStateError, SeriesRecord, conform_slices
from pdd_batch.runs.schema import HEATMAP_COLUMNS, SLICES_FILE_SCHEMA
from pdd_batch.runs.writer import write_table_atomic

if TYPE_CHECKING:
    from pdd_batch.runs.state import RunState

log = logging.getLogger(__name__)

LEGACY_PUBLISHED = "slices.parquet"
MIGRATED_PART = "slices-migrated.parquet"


def _read_state(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise RunStateError(f"_state/{path.name}: unreadable ({exc})") from exc
    if data.get("version") not in (1, 2):
        raise RunStateError(f"_state/{path.name}: version {data.get('version')!r}, expected 1-2")
    return data


def _split(state: RunState, src: Path, keys: list[str] | None, name: str, where: str) -> int:
    """Write the rows of ``keys`` (None: every row) in ``src`` as slices file + heatmaps file
    ``name`` in ``where`` (pending | live); returns the rows."""
    wanted = None if keys is None else pa.array(sorted(keys), type=pa.string())
    pf = pq.ParquetFile(src)
    heat = state.file_path("heatmaps", name, where)
    if "heatmap_png" not in pf.schema_arrow.names and heat.is_file():
        return pf.metadata.num_rows  # split by an attempt killed before its transaction
    parts = []
    for i in range(pf.num_row_groups):
        t = pf.read_row_group(i)
        parts.append(t if wanted is None else t.filter(pc.is_in(t["series_key"], value_set=wanted)))
    table = conform_slices(pa.concat_tables(parts) if parts else pf.schema_arrow.empty_table())
    write_table_atomic(table.select(HEATMAP_COLUMNS), heat)
    scores = table.select(SLICES_FILE_SCHEMA.names).cast(SLICES_FILE_SCHEMA)
    write_table_atomic(scores, state.file_path("slices", name, where))
    return table.num_rows


def _sources(state: RunState, data: dict[str, Any]) -> dict[str, tuple[Path, str, str]]:
    """Old part name -> (its file, new name, new state) for every file holding current rows."""
    v1 = data.get("version") == 1
    out = {}
    for part in data.get("parts", []):  # version 1: in slices/, read as published rows
        src = (state.slices_dir if v1 else state.store_dir) / part
        out[part] = (src, part, "live" if v1 else "pending")
    out[LEGACY_PUBLISHED] = (state.slices_dir / LEGACY_PUBLISHED, MIGRATED_PART, "live")
    return out


def migrate_state_json(state: RunState, path: Path) -> None:
    """Migrate ``path`` (a version 1/2 ``state.json``) into ``state``'s empty run store."""
    data = _read_state(path)
    records = {k: SeriesRecord.from_dict(v) for k, v in data.get("series", {}).items()}
    by_part: dict[str, list[str]] = defaultdict(list)
    for k, rec in records.items():
        if rec.part:
            by_part[rec.part].append(k)
    sources = _sources(state, data)
    files: list[tuple[str, str, int, int]] = []  # (new name, state, rows, current rows)
    renamed: dict[str, str] = {}
    for part, (src, name, where) in sources.items():
        if not src.is_file() or (part != LEGACY_PUBLISHED and part not in by_part):
            continue  # rows gone: their series are forgotten below and screened again
        # the published file stays readable whole (as before) until this version publishes
        keys = None if part == LEGACY_PUBLISHED else by_part[part]
        current = sum(records[k].n_slices for k in by_part.get(part, []))
        files.append((name, where, _split(state, src, keys, name, where), current))
        renamed[part] = name
    _record_all(state, data, records, files, renamed)
    write_live_list(state)
    (state.slices_dir / LEGACY_PUBLISHED).unlink(missing_ok=True)  # now slices-migrated
    path.unlink(missing_ok=True)
    log.info("migrated the run state of an earlier version (%d series)", len(records))


def _register_table(c: Any, state: RunState, tbl: str, filename: str) -> list[str]:
    """Register an old merged ``tbl/filename`` as a live file; returns its study keys."""
    p = state.out_dir / tbl / filename
    if not p.is_file():
        return []
    n = pq.ParquetFile(p).metadata.num_rows
    c.execute(
        "INSERT INTO files(name, tbl, state, n_rows, live_rows) VALUES (?, ?, 'live', ?, ?)",
        (filename, tbl, n, n),
    )
    if tbl != "studies":
        return []
    return [str(k) for k in pq.read_table(p, columns=["study_key"])["study_key"].to_pylist()]


def _record_all(
    state: RunState,
    data: dict[str, Any],
    records: dict[str, SeriesRecord],
    files: list[tuple[str, str, int, int]],
    renamed: dict[str, str],
) -> None:
    """The one transaction of the migration."""
    meta: dict[str, Any] = {
        "version": store.STORE_VERSION,
        "checkpoint_hash": data.get("checkpoint_hash"),
        "model_id": data.get("model_id"),
        "published": data.get("published"),
        "replacing": data.get("replacing"),
        "reflag": bool(data.get("stale")) and "threshold" in data,
    }
    if "threshold" in data:
        meta["threshold"] = data["threshold"]
    rows = []
    for k, r in records.items():
        if r.part and r.part not in renamed:
            continue  # its rows are gone: forgotten, screened again
        name = renamed.get(r.part, "")
        n = r.n_slices if name else 0
        rows.append((k, name, name, n, r.fingerprint, r.study_key, r.dropped_json()))
    with store.transaction(state.conn) as c:
        store.set_meta(c, **meta)
        for name, where, n, current in files:
            for tbl in ("slices", "heatmaps"):
                c.execute(
                    "INSERT INTO files(name, tbl, state, n_rows, live_rows) VALUES (?, ?, ?, ?, ?)",
                    (name, tbl, where, n, current),
                )
        c.executemany(
            "INSERT INTO series(series_key, part, heatmap_part, n_slices, fingerprint, "
            "study_key, dropped) VALUES (?, ?, ?, ?, ?, ?, ?)",
            rows,
        )
        studies = _register_table(c, state, "studies", "studies.parquet")
        c.executemany("INSERT INTO studies VALUES (?, 'studies.parquet')", [(k,) for k in studies])
        c.execute("INSERT OR IGNORE INTO dirty_studies SELECT study_key FROM studies")
        c.execute("INSERT OR IGNORE INTO dirty_studies SELECT study_key FROM series")
        _register_table(c, state, "errors", "errors.parquet")
