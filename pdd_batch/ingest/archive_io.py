"""Where file bytes come from: plain files, or members of .zip/.tar archives.

Every file is named by a posix path relative to the archive root. A member of a .zip/.tar
inside the root is named ``"<archive path>!<member path>"``, e.g. ``"2024/batch.zip!s1/IM1.dcm"``:
workers read it again later with ``MemberReader(root).read(rel)`` (or ``open_source``).

``IngestLimits`` caps what a header or an archive entry can make ingestion allocate: members
bigger than ``max_member_bytes`` or expanding more than ``max_compression_ratio`` times are
refused before they are read. A compressed tar (.tar.gz/.tgz, .tar.bz2, .tar.xz) is one
compressed stream: its total decompressed output is capped at ``max_compression_ratio`` times
the archive's file size (a member reaching past that is refused before it is read, and listing
stops there), so neither memory nor time grows past the cap.
"""

from __future__ import annotations

import bz2
import gzip
import io
import lzma
import tarfile
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, BinaryIO

MEMBER_SEP = "!"
# Magic bytes of the compressed streams tarfile reads: gzip, xz, and bzip2 ("BZh", the block
# size digit, then the block magic: a plain tar's first member name may well start "BZh").
_GZIP_MAGIC, _XZ_MAGIC, _BZ2_MAGIC, _BZ2_BLOCK = b"\x1f\x8b", b"\xfd7zXZ\x00", b"BZh", b"1AY&SY"
ARCHIVE_SUFFIXES = (".zip", ".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tbz2", ".tar.xz", ".txz")


class ArchiveReadError(OSError):
    """An archive or member that cannot be read (message names the relative path only)."""


class OverLimitError(ValueError):
    """An input over one of the ``IngestLimits`` (the message names the limit and its option)."""


@dataclass(frozen=True)
class IngestLimits:
    """Caps on what one input can make discovery (driver) or a read task (worker) allocate.

    The defaults pass every real file in the project's test data with a wide margin (largest
    series 29 M voxels, most frames in a file 63, highest gzip ratio 306 for a lesion mask).

    Attributes:
        max_series_voxels: voxels of one series over all its volumes (float32: 4 bytes each),
            also the cap of one file's frames x rows x columns.
        max_frames_per_file: NumberOfFrames of one DICOM file.
        max_member_bytes: uncompressed size of one .zip/.tar member (read whole into memory).
        max_compression_ratio: uncompressed / compressed size of a zip member, of a compressed
            tar's whole output (.tar.gz, .tgz, .tar.bz2, .tar.xz), of a .nii.gz file (the
            compressed bytes its gzip members take) or of a compressed DICOM image (gzip of
            zeros, a "bomb", reaches about 1000).
    """

    max_series_voxels: int = 2**30
    max_frames_per_file: int = 20_000
    max_member_bytes: int = 2**31
    max_compression_ratio: float = 800.0

    def __post_init__(self) -> None:
        for f in fields(self):
            if not getattr(self, f.name) > 0:
                raise ValueError(f"{f.name} must be > 0, got {getattr(self, f.name)}")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (sent to read tasks)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> IngestLimits:
        """Inverse of ``to_dict``; ``None`` gives the defaults."""
        return cls(**(d or {}))

    def check_ratio(self, what: str, expanded: int, stored: int) -> None:
        """Raise ``OverLimitError`` when ``expanded`` bytes from ``stored`` exceed the ratio cap."""
        if expanded > self.max_compression_ratio * max(stored, 1):
            raise OverLimitError(
                f"{what} expands {expanded / max(stored, 1):.0f}x, over the compression-ratio "
                f"cap of {self.max_compression_ratio:g}x (--max-compression-ratio)"
            )

    def check_member(self, size: int, compressed: int | None = None) -> None:
        """Raise ``OverLimitError`` for a member over the size or compression-ratio cap."""
        if size > self.max_member_bytes:
            raise OverLimitError(
                f"archive member of {size} bytes, over the cap of {self.max_member_bytes} "
                "(--max-member-bytes)"
            )
        if compressed is not None:
            self.check_ratio("archive member", size, compressed)

    def check_voxels(self, what: str, n_voxels: int) -> None:
        """Raise ``OverLimitError`` when ``n_voxels`` exceed ``max_series_voxels``."""
        if n_voxels > self.max_series_voxels:
            raise OverLimitError(
                f"{what} of {n_voxels} voxels, over the cap of {self.max_series_voxels} "
                "(--max-series-voxels)"
            )


def is_archive_name(name: str) -> bool:
    """True for names ending like a supported archive (.zip, .tar, .tar.gz, ...)."""
    low = name.lower()
    return any(low.endswith(s) for s in ARCHIVE_SUFFIXES)


def join_member(archive_rel: str, member: str) -> str:
    """The relative name of a member of an archive."""
    return f"{archive_rel}{MEMBER_SEP}{member}"


def split_member(rel: str) -> tuple[str, str | None]:
    """Split ``"a.zip!b/c.dcm"`` into ``("a.zip", "b/c.dcm")``; plain paths give ``(rel, None)``."""
    start = 0
    while (i := rel.find(MEMBER_SEP, start)) != -1:
        if is_archive_name(rel[:i]):
            return rel[:i], rel[i + 1 :]
        start = i + 1
    return rel, None


@dataclass(frozen=True)
class BinarySource:
    """Something that can be opened as a binary stream more than once."""

    opener: Callable[[], BinaryIO]
    size: int

    def open(self) -> BinaryIO:
        """A fresh binary stream positioned at the start."""
        return self.opener()


def file_source(path: Path) -> BinarySource:
    """A plain file on disk."""
    return BinarySource(opener=lambda: open(path, "rb"), size=path.stat().st_size)


def bytes_source(data: bytes) -> BinarySource:
    """Bytes already in memory (an archive member)."""
    return BinarySource(opener=lambda: io.BytesIO(data), size=len(data))


class _CappedStream:
    """The decompressed stream of a compressed tar, capped at ``max_compression_ratio`` times
    the archive's size on disk.

    tarfile reads headers and members through it and skips members by seeking forward (which
    inflates and discards); a read or seek reaching past the cap raises ``OverLimitError``
    before more is inflated.
    """

    def __init__(self, raw: BinaryIO, stored: int, limits: IngestLimits) -> None:
        self._raw = raw
        self._stored = stored
        self._limits = limits
        self._cap = int(limits.max_compression_ratio * max(stored, 1))

    def check_end(self, end: int) -> None:
        """Raise ``OverLimitError`` when output up to byte ``end`` is over the ratio cap."""
        self._limits.check_ratio("compressed tar archive", end, self._stored)

    def tell(self) -> int:
        return self._raw.tell()

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        if whence not in (io.SEEK_SET, io.SEEK_CUR):
            raise io.UnsupportedOperation("a compressed stream seeks from its start only")
        target = offset if whence == io.SEEK_SET else self._raw.tell() + offset
        self.check_end(target)
        return self._raw.seek(target)

    def read(self, size: int = -1) -> bytes:
        room = max(self._cap - self._raw.tell(), 0)
        data = self._raw.read(room + 1 if size < 0 or size > room else size)
        self.check_end(self._raw.tell())
        return data

    def close(self) -> None:
        self._raw.close()


def _decompressor(path: Path) -> Callable[..., BinaryIO] | None:
    """``gzip.open``, ``bz2.open`` or ``lzma.open`` for a compressed file, from its first
    bytes; ``None`` for anything else (a plain tar)."""
    with open(path, "rb") as fh:
        magic = fh.read(10)
    if magic.startswith(_GZIP_MAGIC):
        return gzip.open
    if magic.startswith(_XZ_MAGIC):
        return lzma.open
    if magic.startswith(_BZ2_MAGIC) and magic[4:10] == _BZ2_BLOCK:
        return bz2.open
    return None


def _open_tar(path: Path, limits: IngestLimits) -> tuple[tarfile.TarFile, _CappedStream | None]:
    """A tar archive opened for reading: a compressed one through a ``_CappedStream`` (returned
    too: the caller closes it after the archive), a plain one directly."""
    opener = _decompressor(path)
    if opener is None:
        return tarfile.open(path, mode="r:"), None
    stream = _CappedStream(opener(path, "rb"), path.stat().st_size, limits)
    try:
        return tarfile.open(fileobj=stream, mode="r:"), stream  # type: ignore[arg-type]
    except BaseException:
        stream.close()
        raise


def iter_archive_members(
    path: Path, limits: IngestLimits | None = None
) -> Iterator[tuple[str, int, Callable[[], bytes]]]:
    """Regular-file members of a .zip/.tar: (member name, size, reader of its bytes).

    The reader raises ``OverLimitError`` for a member over ``limits`` (declared size, zip
    compression ratio, or a compressed tar's output up to the member's end) before reading
    anything, and ``ArchiveReadError`` for one that cannot be read (bad CRC, encrypted, cut
    short).

    Raises:
        ArchiveReadError: the archive cannot be opened, ends early / is corrupt after some
            members were listed, or a compressed tar's listing reached the compression-ratio
            cap (the message says how many members were listed).
    """
    limits = limits or IngestLimits()
    n = 0
    try:
        if path.name.lower().endswith(".zip"):
            with zipfile.ZipFile(path) as zf:
                for info in zf.infolist():
                    if not info.is_dir():
                        n += 1
                        yield info.filename, info.file_size, _zip_reader(zf, info, limits)
        else:
            tf, stream = _open_tar(path, limits)
            try:
                for member in tf:
                    if member.isfile():
                        n += 1
                        yield member.name, member.size, _tar_reader(tf, member, limits, stream)
            finally:
                tf.close()
                if stream is not None:
                    stream.close()
    except OverLimitError as exc:  # a compressed tar's output reached the cap: listing stops
        raise ArchiveReadError(f"archive listing stopped after {n} member(s): {exc}") from exc
    except Exception as exc:  # noqa: BLE001 - any damage: this archive's record, not the run
        where = f" after {n} member(s)" if n else ""
        raise ArchiveReadError(f"cannot read archive{where} ({type(exc).__name__})") from exc


def _zip_reader(
    zf: zipfile.ZipFile, info: zipfile.ZipInfo, limits: IngestLimits
) -> Callable[[], bytes]:
    def read() -> bytes:
        limits.check_member(info.file_size, info.compress_size)
        return _guarded(lambda: zf.read(info))

    return read


def _tar_reader(
    tf: tarfile.TarFile,
    member: tarfile.TarInfo,
    limits: IngestLimits,
    stream: _CappedStream | None,
) -> Callable[[], bytes]:
    def read() -> bytes:
        _check_tar_member(member, limits, stream)
        fh = tf.extractfile(member)
        if fh is None:
            raise ArchiveReadError("archive member is not a regular file")
        return _guarded(fh.read)

    return read


def _check_tar_member(
    member: tarfile.TarInfo, limits: IngestLimits, stream: _CappedStream | None
) -> None:
    """Raise ``OverLimitError`` for a tar member over the size cap, or (compressed tar) one whose
    end lies past the archive's output cap: refused before any of it is inflated."""
    limits.check_member(member.size)
    if stream is not None:
        stream.check_end(member.offset_data + member.size)


def _guarded(read: Callable[[], bytes]) -> bytes:
    """``read()``, any failure (bad CRC, encrypted, truncated stream) as ``ArchiveReadError``."""
    try:
        return read()
    except Exception as exc:  # noqa: BLE001 - zipfile/tarfile/zlib/gzip raise many types
        raise ArchiveReadError(f"cannot read archive member ({type(exc).__name__})") from exc


def _find_tar_member(tf: tarfile.TarFile, name: str) -> tarfile.TarInfo:
    """The first member called ``name``, listing the archive only as far as needed (a member
    past a compressed tar's output cap never blocks the members before it).

    Raises:
        KeyError: no such member.
    """
    found = next((m for m in tf if m.name == name), None)
    if found is None:
        raise KeyError(name)
    return found


class MemberReader:
    """Reads plain files and archive members under ``root``, keeping archives open between reads.

    Use as a context manager in workers that read many members of the same archive.
    """

    def __init__(self, root: Path, limits: IngestLimits | None = None) -> None:
        self.root = Path(root)
        self.limits = limits or IngestLimits()
        self._open: dict[str, zipfile.ZipFile | tarfile.TarFile] = {}
        self._streams: dict[str, _CappedStream] = {}  # of the compressed tars in ``_open``

    def __enter__(self) -> MemberReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close every archive opened so far."""
        for handle in self._open.values():
            handle.close()
        for stream in self._streams.values():
            stream.close()
        self._open.clear()
        self._streams.clear()

    def _archive(self, archive_rel: str) -> zipfile.ZipFile | tarfile.TarFile:
        if archive_rel not in self._open:
            path = self.root / archive_rel
            try:
                if archive_rel.lower().endswith(".zip"):
                    self._open[archive_rel] = zipfile.ZipFile(path)
                else:
                    tf, stream = _open_tar(path, self.limits)
                    self._open[archive_rel] = tf
                    if stream is not None:
                        self._streams[archive_rel] = stream
            except Exception as exc:  # noqa: BLE001 - OSError, BadZipFile, TarError, LZMAError...
                raise ArchiveReadError(f"{archive_rel}: cannot open archive") from exc
        return self._open[archive_rel]

    def source(self, rel: str) -> BinarySource:
        """A ``BinarySource`` for ``rel`` (plain path or ``archive!member``)."""
        archive_rel, member = split_member(rel)
        if member is None:
            path = self.root / rel
            if not path.is_file():
                raise ArchiveReadError(f"{rel}: file not found")
            return file_source(path)
        handle = self._archive(archive_rel)
        try:
            if isinstance(handle, zipfile.ZipFile):
                info = handle.getinfo(member)
                self.limits.check_member(info.file_size, info.compress_size)
                data = handle.read(info)
            else:
                tar_info = _find_tar_member(handle, member)
                _check_tar_member(tar_info, self.limits, self._streams.get(archive_rel))
                fh = handle.extractfile(tar_info)
                if fh is None:
                    raise KeyError(member)
                data = fh.read()
        except OverLimitError:
            raise
        except Exception as exc:  # noqa: BLE001 - bad CRC, encrypted, cut short, missing
            raise ArchiveReadError(
                f"{rel}: cannot read archive member ({type(exc).__name__})"
            ) from exc
        return bytes_source(data)

    def read(self, rel: str) -> bytes:
        """All bytes of ``rel``."""
        with self.source(rel).open() as fh:
            return fh.read()
