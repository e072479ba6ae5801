"""WADO-RS retrieve of one series, streamed to disk under byte caps.

The ``multipart/related`` answer is parsed as it arrives: each part goes straight to a private
(0600) file, so memory stays at one network chunk whatever the server sends, and a part larger
than ``max_instance_bytes`` or a series larger than ``max_series_bytes`` stops the retrieve with
a ``FetchCapError`` (the series becomes one error row; the partial files are removed by the
caller). Each part must be a DICOM file (PS3.10, as ``application/dicom`` is defined) and is
named by a digest of its SOP Instance UID (``instance_file_name``), read without pydicom's value
validation (its warnings quote UIDs).
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from pdd_batch.ingest.dicomweb_http import DicomwebError, Endpoint, get, new_session, quiet_pydicom

GIB = 1024**3
DEFAULT_MAX_INSTANCE_BYTES = 2 * GIB  # one instance (a multipart part)
DEFAULT_MAX_SERIES_BYTES = 16 * GIB  # all instances of one series together
CHUNK_BYTES = 1 << 20
PRIVATE_FILE_MODE, PRIVATE_DIR_MODE = 0o600, 0o700
# WADO-RS in the stored transfer syntax (no transcoding on the server: the same pixels as a file)
ACCEPT_ANY_SYNTAX = 'multipart/related; type="application/dicom"; transfer-syntax=*'
_BOUNDARY = re.compile(r'boundary="?([^";,]+)"?', re.IGNORECASE)


class FetchCapError(DicomwebError):
    """A retrieve went over a byte cap."""


@dataclass(frozen=True)
class FetchLimits:
    """Byte caps of a retrieve (``--max-instance-bytes``, ``--max-series-bytes``)."""

    max_instance_bytes: int = DEFAULT_MAX_INSTANCE_BYTES
    max_series_bytes: int = DEFAULT_MAX_SERIES_BYTES


DEFAULT_LIMITS = FetchLimits()


class _PartWriter:
    """Counts and writes the bytes of the parts to numbered files under the caps."""

    def __init__(self, folder: Path, limits: FetchLimits) -> None:
        self.folder, self.limits = folder, limits
        self.paths: list[Path] = []
        self.total = 0
        self._file: BinaryIO | None = None
        self._part = 0

    def open(self) -> None:
        self.close()
        path = self.folder / f"part-{len(self.paths):06d}.tmp"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, PRIVATE_FILE_MODE)
        self._file, self._part = os.fdopen(fd, "wb"), 0
        self.paths.append(path)

    def write(self, data: bytes) -> None:
        if not data:
            return
        if self._file is None:
            raise DicomwebError("WADO-RS answer is not a multipart message")
        self._part += len(data)
        self.total += len(data)
        if self._part > self.limits.max_instance_bytes:
            raise FetchCapError(
                f"an instance is larger than {self.limits.max_instance_bytes} bytes "
                "(--max-instance-bytes)"
            )
        if self.total > self.limits.max_series_bytes:
            raise FetchCapError(
                f"the series is larger than {self.limits.max_series_bytes} bytes "
                "(--max-series-bytes)"
            )
        self._file.write(data)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def split_multipart(chunks: Iterable[bytes], boundary: bytes, out: _PartWriter) -> None:
    """Write the bodies of a ``multipart/related`` stream to ``out`` (headers dropped), holding
    at most one chunk plus a delimiter's length in memory."""
    delim = b"\r\n--" + boundary
    buf = b"\r\n"  # the first delimiter may open the body without a preceding CRLF
    in_headers = False
    started = False
    for chunk in chunks:
        buf += chunk
        while True:
            if in_headers:
                end = buf.find(b"\r\n\r\n")
                if end < 0:
                    if len(buf) > 64 * 1024:
                        raise DicomwebError("WADO-RS answer: part headers too long")
                    break
                buf, in_headers = buf[end + 4 :], False
                out.open()
                continue
            at = buf.find(delim)
            if at < 0:
                keep = len(delim) + 1
                if started and len(buf) > keep:
                    out.write(buf[:-keep])
                buf = buf[-keep:] if len(buf) > keep else buf
                break
            if started:
                out.write(buf[:at])
            rest = buf[at + len(delim) :]
            if len(rest) < 2:
                buf = buf[at:]
                break
            if rest.startswith(b"--"):  # the closing delimiter
                out.close()
                return
            buf, in_headers, started = rest, True, True
            out.close()
    out.close()
    if started:
        raise DicomwebError("WADO-RS answer ended before its closing boundary")


def _boundary(content_type: str) -> bytes:
    found = _BOUNDARY.search(content_type or "")
    if not content_type.lower().startswith("multipart/") or found is None:
        raise DicomwebError("WADO-RS answer is not a multipart message")
    return found.group(1).encode("ascii", "replace")


def _sop_uid(path: Path) -> str:
    """The SOP Instance UID of a received part (a DICOM file: PS3.10 preamble and ``DICM``;
    header only, without value validation).

    Raises:
        DicomwebError: not a DICOM file, or no SOP Instance UID.
    """
    import pydicom
    from pydicom.errors import InvalidDicomError

    with path.open("rb") as f:
        if f.read(132)[128:] != b"DICM":
            raise DicomwebError("a retrieved instance is not a DICOM file (no DICM header)")
    with quiet_pydicom():
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["SOPInstanceUID"])
        except (InvalidDicomError, OSError, ValueError, EOFError) as exc:
            name = type(exc).__name__
            raise DicomwebError(f"a retrieved instance is not readable ({name})") from None
    uid = str(ds.get("SOPInstanceUID", "") or "")
    if not uid:
        raise DicomwebError("a retrieved instance has no SOP Instance UID")
    return uid


def retrieve_series(
    endpoint: Endpoint,
    study_uid: str,
    series_uid: str,
    folder: Path,
    name_of: Any,
    limits: FetchLimits = DEFAULT_LIMITS,
) -> int:
    """Retrieve one series (WADO-RS) into ``folder`` (one 0600 file per instance, named
    ``name_of(sop_uid)``); returns the number of instances.

    Raises:
        FetchCapError: a part or the series over its cap.
        DicomwebError: the retrieve failed (path-free).
    """
    writer = _PartWriter(folder, limits)
    path = f"/studies/{study_uid}/series/{series_uid}"
    with new_session(endpoint) as session:
        response = get(
            session, endpoint, path, what="WADO-RS retrieve", accept=ACCEPT_ANY_SYNTAX, stream=True
        )
        with response:
            boundary = _boundary(response.headers.get("Content-Type", ""))
            try:
                split_multipart(_chunks(response), boundary, writer)
            finally:
                writer.close()
    names = set()
    for part in writer.paths:
        name = name_of(_sop_uid(part))
        os.replace(part, folder / name)
        names.add(name)
    return len(names)


def _chunks(response: Any) -> Iterator[bytes]:
    import requests

    try:
        yield from response.iter_content(CHUNK_BYTES)
    except requests.RequestException as exc:
        raise DicomwebError(f"WADO-RS retrieve failed ({type(exc).__name__})") from None
