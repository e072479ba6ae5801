"""Where file bytes come from: plain files, or members of .zip/.tar archives.

Every file is named by a posix path relative to the archive root. A member of a .zip/.tar
inside the root is named ``"<archive path>!<member path>"``, e.g. ``"2024/batch.zip!s1/IM1.dcm"``:
workers read it again later with ``MemberReader(root).read(rel)`` (or ``open_source``).
"""

from __future__ import annotations

import io
import tarfile
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

MEMBER_SEP = "!"
ARCHIVE_SUFFIXES = (".zip", ".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tbz2", ".tar.xz", ".txz")


class ArchiveReadError(OSError):
    """An archive or member that cannot be read (message names the relative path only)."""


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


def iter_archive_members(path: Path) -> Iterator[tuple[str, int, Callable[[], bytes]]]:
    """Regular-file members of a .zip/.tar: (member name, size, reader of its bytes).

    Raises:
        ArchiveReadError: the archive itself cannot be opened.
    """
    try:
        if path.name.lower().endswith(".zip"):
            with zipfile.ZipFile(path) as zf:
                for info in zf.infolist():
                    if not info.is_dir():
                        yield info.filename, info.file_size, _zip_reader(zf, info.filename)
        else:
            with tarfile.open(path) as tf:
                for member in tf:
                    if member.isfile():
                        yield member.name, member.size, _tar_reader(tf, member)
    except (zipfile.BadZipFile, tarfile.TarError, EOFError) as exc:
        raise ArchiveReadError(f"cannot read archive ({type(exc).__name__})") from exc


def _zip_reader(zf: zipfile.ZipFile, name: str) -> Callable[[], bytes]:
    return lambda: zf.read(name)


def _tar_reader(tf: tarfile.TarFile, member: tarfile.TarInfo) -> Callable[[], bytes]:
    def read() -> bytes:
        fh = tf.extractfile(member)
        if fh is None:
            raise ArchiveReadError("archive member is not a regular file")
        return fh.read()

    return read


class MemberReader:
    """Reads plain files and archive members under ``root``, keeping archives open between reads.

    Use as a context manager in workers that read many members of the same archive.
    """

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self._open: dict[str, zipfile.ZipFile | tarfile.TarFile] = {}

    def __enter__(self) -> MemberReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close every archive opened so far."""
        for handle in self._open.values():
            handle.close()
        self._open.clear()

    def _archive(self, archive_rel: str) -> zipfile.ZipFile | tarfile.TarFile:
        if archive_rel not in self._open:
            path = self.root / archive_rel
            try:
                if archive_rel.lower().endswith(".zip"):
                    self._open[archive_rel] = zipfile.ZipFile(path)
                else:
                    self._open[archive_rel] = tarfile.open(path)
            except (OSError, zipfile.BadZipFile, tarfile.TarError) as exc:
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
                data = handle.read(member)
            else:
                fh = handle.extractfile(member)
                if fh is None:
                    raise KeyError(member)
                data = fh.read()
        except (KeyError, OSError, zipfile.BadZipFile, tarfile.TarError) as exc:
            raise ArchiveReadError(f"{rel}: cannot read archive member") from exc
        return bytes_source(data)

    def read(self, rel: str) -> bytes:
        """All bytes of ``rel``."""
        with self.source(rel).open() as fh:
            return fh.read()
