"""Atomic, private Parquet/JSON/bytes writes for run and export folders.

Every file is written to a hidden temporary name in its final folder (``.NAME.XXXX.tmp``, which
no reader's ``*.parquet`` glob matches and which pyarrow's dataset discovery skips), created with
mode 0600 whatever the umask, flushed to disk, then renamed over its final name. A crash therefore
never leaves a half-written file that looks complete; leftovers are removed by
``remove_temp_files`` when the next run starts. Folders created here are 0700.

A failed write raises ``WriteError``, whose message names the file relative to its folder and the
OS reason (``No space left on device (ENOSPC)``), never an absolute path.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import stat
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import IO, Any

import pyarrow as pa
import pyarrow.parquet as pq

from pdd_batch.runs.schema import SCHEMA_VERSION

log = logging.getLogger(__name__)

TEMP_SUFFIX = ".tmp"
PARQUET_COMPRESSION = "zstd"
PRIVATE_FILE_MODE = 0o600
PRIVATE_DIR_MODE = 0o700


class WriteError(OSError):
    """A file that could not be written; the message names the file (never a full path)."""


def os_reason(exc: BaseException) -> str:
    """An OS error's reason without the file it names: ``No space left on device (ENOSPC)``."""
    if isinstance(exc, OSError) and exc.errno is not None:
        name = errno.errorcode.get(exc.errno, str(exc.errno))
        return f"{exc.strerror or os.strerror(exc.errno)} ({name})"
    text = str(exc)
    if isinstance(exc, OSError) and exc.filename:  # no errno: drop the quoted file names
        for f in (exc.filename, exc.filename2):
            text = text.replace(repr(str(f)), "").replace(str(f), "") if f else text
    return f"{type(exc).__name__}: {text.strip(' :')}"[:200]


def ensure_private_dir(folder: Path) -> Path:
    """Create ``folder`` (and missing parents) with mode 0700; an existing folder is left as is."""
    folder = Path(folder)
    missing = []
    p = folder
    while not p.exists():
        missing.append(p)
        if p.parent == p:
            break
        p = p.parent
    for d in reversed(missing):
        try:
            d.mkdir(mode=PRIVATE_DIR_MODE)
        except FileExistsError:
            continue
        os.chmod(d, PRIVATE_DIR_MODE)  # the umask may have removed owner bits
    return folder


def make_private(path: Path) -> None:
    """Set an existing folder to 0700 (file: 0600); a path owned by someone else is only logged."""
    mode = PRIVATE_DIR_MODE if path.is_dir() else PRIVATE_FILE_MODE
    try:
        if stat.S_IMODE(path.lstat().st_mode) != mode and not path.is_symlink():
            os.chmod(path, mode)
    except OSError as exc:
        log.warning("cannot make %s private: %s", path.name, os_reason(exc))


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


def _label(final: Path) -> str:
    return f"{final.parent.name}/{final.name}" if final.parent.name else final.name


def write_atomic(final: Path, fill: Callable[[IO[bytes]], None]) -> Path:
    """Write ``final`` through a private temp file: ``fill(fh)`` writes the content, then the
    file is flushed, fsynced and renamed over ``final``.

    Raises:
        WriteError: the folder, the temp file or the rename failed (disk full, read-only...).
    """
    final = Path(final)
    tmp = _temp_path(final)
    try:
        ensure_private_dir(final.parent)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, PRIVATE_FILE_MODE)
        with os.fdopen(fd, "wb") as fh:
            os.fchmod(fh.fileno(), PRIVATE_FILE_MODE)
            fill(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, final)
        _fsync_dir(final.parent)
    except (OSError, pa.ArrowException) as exc:
        tmp.unlink(missing_ok=True)
        raise WriteError(f"cannot write {_label(final)}: {os_reason(exc)}") from exc
    return final


def write_bytes_atomic(data: bytes, final: Path) -> Path:
    """Write ``data`` to ``final`` (atomic, mode 0600)."""
    return write_atomic(final, lambda fh: fh.write(data))


def write_table_atomic(table: pa.Table, final: Path) -> Path:
    """Write ``table`` to ``final`` (Parquet, zstd) through a temp file and a rename."""
    return write_atomic(
        final, lambda fh: pq.write_table(table, fh, compression=PARQUET_COMPRESSION)
    )


def write_tables_atomic(schema: pa.Schema, tables: Iterable[pa.Table], final: Path) -> int:
    """Stream ``tables`` (each conforming to ``schema``) into one Parquet file, atomically; only
    one input table is in memory at a time. Returns the rows written."""
    rows = 0

    def fill(fh: IO[bytes]) -> None:
        nonlocal rows
        with pq.ParquetWriter(fh, schema, compression=PARQUET_COMPRESSION) as writer:
            for table in tables:
                writer.write_table(table)
                rows += table.num_rows

    write_atomic(final, fill)
    return rows


def write_json_atomic(data: Mapping[str, Any], final: Path) -> Path:
    """Write a JSON object to ``final`` through a temp file and a rename."""
    text = json.dumps(data, indent=2, sort_keys=True, default=str)
    return write_bytes_atomic(text.encode("utf-8"), final)


def overwrite_in_place(data: bytes, final: Path) -> None:
    """Overwrite an existing file's bytes in place (no new file, so it can still succeed on a
    full disk when ``data`` fits in the blocks the file has). Not atomic: a last resort.

    Raises:
        WriteError: the file is absent or the write failed.
    """
    try:
        fd = os.open(final, os.O_WRONLY)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.ftruncate(fd, len(data))
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as exc:
        raise WriteError(f"cannot write {_label(Path(final))}: {os_reason(exc)}") from exc


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
