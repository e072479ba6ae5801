"""The discovery file index of a run folder, kept in the run store (tables ``file_index`` and
``index_series``), and ``discover_indexed``: discovery that reads only new or changed files
(``pdd_batch.ingest.file_index``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pdd_batch.ingest.archive_io import IngestLimits
from pdd_batch.ingest.file_index import FileIndex, IndexEntry, IndexUpdate, discover_incremental
from pdd_batch.ingest.header_read import HeaderReader, read_in_process
from pdd_batch.ingest.series import Discovery
from pdd_batch.runs import store
from pdd_batch.runs.state import RunState


def load_index(state: RunState) -> FileIndex:
    """The whole index (one pass over two tables: the walk is as long anyway)."""
    index = FileIndex()
    rows = state.conn.execute(
        "SELECT file_key, size, mtime_ns, status, reason, series_key, token, position "
        "FROM file_index"
    )
    for key, *entry in rows:
        index.files[key] = IndexEntry(*entry)
    for key, ref in state.conn.execute("SELECT series_key, ref FROM index_series"):
        index.series[key] = json.loads(ref)
    return index


def save_index(state: RunState, update: IndexUpdate) -> None:
    """Apply ``update`` in one transaction."""
    files = [
        (k, e.size, e.mtime_ns, e.status, e.reason, e.series_key, e.token, e.position)
        for k, e in update.files.items()
    ]
    series = [(k, json.dumps(ref, sort_keys=True)) for k, ref in update.series.items()]
    with store.transaction(state.conn) as c:
        c.executemany(
            "DELETE FROM file_index WHERE file_key = ?", [(k,) for k in update.removed_files]
        )
        c.executemany(
            "DELETE FROM index_series WHERE series_key = ?", [(k,) for k in update.removed_series]
        )
        c.executemany("INSERT OR REPLACE INTO file_index VALUES (?, ?, ?, ?, ?, ?, ?, ?)", files)
        c.executemany("INSERT OR REPLACE INTO index_series VALUES (?, ?)", series)


def discover_indexed(
    state: RunState,
    archive: Path,
    *,
    open_archives: bool = False,
    limits: IngestLimits | None = None,
    follow_links_outside: bool = False,
    read_headers: HeaderReader = read_in_process,
) -> tuple[Discovery, dict[str, Any]]:
    """Discover ``archive`` against the folder's index and update it; returns the discovery
    and, for the manifest, ``{"header_reads", "files_unchanged", "shards"}`` (``shards``: the
    Ray tasks ``read_headers`` ran, 0 when every header was read in this process)."""
    disc, update = discover_incremental(
        archive,
        load_index(state),
        open_archives=open_archives,
        limits=limits,
        follow_links_outside=follow_links_outside,
        read_headers=read_headers,
    )
    save_index(state, update)
    return disc, {
        "header_reads": update.header_reads,
        "files_unchanged": update.files_unchanged,
        "shards": update.shards,
    }
