"""Atomic Parquet and JSON writes for run folders.

Every file is written to a hidden temporary name in its final folder (``.NAME.XXXX.tmp``, which
no reader's ``*.parquet`` glob matches and which pyarrow's dataset discovery skips), flushed to
disk, then renamed over its final name. A crash therefore never leaves a half-written file that
looks complete; leftovers are removed by ``remove_temp_files`` when the next run starts.
"""

from __future__ import annotations

import json
import logging
import os
import uuid
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from pdd_batch.runs.schema import SCHEMA_VERSION

log = logging.getLogger(__name__)

TEMP_SUFFIX = ".tmp"
PARQUET_COMPRESSION = "zstd"


class WriteError(OSError):
    """A run-folder file that could not be written; the message names the file."""


def _fsync_dir(folder: Path) -> None:
    """Make a rename durable (directory entry flushed); a no-op where unsupported."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _temp_path(final: Path) -> Path:
    return final.with_name(f".{final.name}.{uuid.uuid4().hex[:8]}{TEMP_SUFFIX}")


def _commit(tmp: Path, final: Path) -> None:
    with open(tmp, "rb+") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, final)
    _fsync_dir(final.parent)


def write_table_atomic(table: pa.Table, final: Path) -> Path:
    """Write ``table`` to ``final`` (Parquet, zstd) through a temp file and a rename."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_path(final)
    try:
        pq.write_table(table, tmp, compression=PARQUET_COMPRESSION)
        _commit(tmp, final)
    except (OSError, pa.ArrowException) as exc:
        tmp.unlink(missing_ok=True)
        raise WriteError(f"cannot write {final.parent.name}/{final.name}: {exc}") from exc
    return final


def write_json_atomic(data: Mapping[str, Any], final: Path) -> Path:
    """Write a JSON object to ``final`` through a temp file and a rename."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_path(final)
    try:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=True, default=str), encoding="utf-8")
        _commit(tmp, final)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise WriteError(f"cannot write {final.name}: {exc}") from exc
    return final


def rows_to_table(rows: Sequence[Mapping[str, Any]], schema: pa.Schema) -> pa.Table:
    """Rows (dicts keyed by column) -> a table of exactly ``schema`` (``schema_version`` filled)."""
    name = schema.metadata.get(b"table", b"?").decode() if schema.metadata else "?"
    filled = [{"schema_version": SCHEMA_VERSION, **row} for row in rows]
    try:
        table = pa.Table.from_pylist(filled, schema=schema)
    except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError) as exc:
        raise WriteError(f"rows do not match the {name} schema: {exc}") from exc
    missing = [f.name for f in schema if not f.nullable and table.column(f.name).null_count]
    if missing:
        raise WriteError(f"rows do not match the {name} schema: nulls in required {missing}")
    return table


def remove_temp_files(folders: Iterable[Path]) -> int:
    """Delete temp files left by an interrupted write; returns how many were removed."""
    removed = 0
    for folder in folders:
        if not folder.is_dir():
            continue
        for p in folder.iterdir():
            if p.name.startswith(".") and p.name.endswith(TEMP_SUFFIX):
                p.unlink(missing_ok=True)
                removed += 1
    if removed:
        log.info("removed %d temporary files left by an interrupted run", removed)
    return removed


def read_parts(folder: Path, names: Sequence[str]) -> pa.Table | None:
    """Concatenate the named Parquet parts of one folder (``None`` when there are none)."""
    tables = [pq.read_table(folder / n) for n in names]
    if not tables:
        return None
    return pa.concat_tables(tables, promote_options="permissive")
