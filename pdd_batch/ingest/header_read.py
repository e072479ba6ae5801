"""Reading one file's header for discovery: a pure function of the file (``read_file``) that
returns plain, small records (``FileResult``: no pixel data, nothing keyed), so the driver and
Ray tasks (``jobs.discovery_shards``) run the same code and the driver merges what either found
(``discovery.Collector.add``).

A file gives one result; a .zip/.tar file opened with ``open_archives`` gives one per member (an
archive that cannot be opened: one failed result). Any error of one file or member is that
file's failed result with a path-free reason; nothing here raises for a bad input.

``plan_shards`` cuts a walk-ordered list of files into shards by folder for the sharded reader.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Protocol

from pdd_batch.ingest.archive_io import (
    ArchiveReadError,
    BinarySource,
    IngestLimits,
    OverLimitError,
    bytes_source,
    file_source,
    is_archive_name,
    iter_archive_members,
    join_member,
)
from pdd_batch.ingest.dicom_headers import (
    NOT_DICOM,
    DicomHeader,
    DicomHeaderError,
    read_header,
    skip_reason,
)
from pdd_batch.ingest.nifti_volume import NiftiInfo, NiftiReadError, is_nifti_name, read_nifti_info

DICOM_SUFFIXES = (".dcm", ".dicom", ".ima", ".dic")
HEADER = "header"  # a DICOM image header, to be grouped into series
NIFTI = "nifti"  # a NIfTI image: one series
NOT_OPENED = "archive file not opened (use --open-archives)"


@dataclass(frozen=True)
class FileResult:
    """What reading one file (or archive member) found.

    ``status`` is ``header`` (``header`` set), ``nifti`` (``nifti`` set), or a record status:
    ``skipped`` / ``failed`` with a path-free ``reason``. ``retry`` marks a failure of the
    reading machinery (a header task that died), not of the file: the file index does not keep
    it, so the next run reads the file again.
    """

    rel: str
    status: str
    reason: str = ""
    header: DicomHeader | None = None
    nifti: NiftiInfo | None = None
    retry: bool = False


@dataclass(frozen=True)
class ReadSpec:
    """How to read headers: the archive root, whether to open .zip/.tar files, the caps."""

    root: Path
    open_archives: bool = False
    limits: IngestLimits = field(default_factory=IngestLimits)

    def to_dict(self) -> dict[str, Any]:
        """Plain values for a Ray task (``from_dict`` rebuilds it)."""
        return {
            "root": str(self.root),
            "open_archives": self.open_archives,
            "limits": self.limits.to_dict(),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ReadSpec:
        return cls(Path(d["root"]), bool(d["open_archives"]), IngestLimits.from_dict(d["limits"]))


@dataclass
class HeaderBatch:
    """The results of reading a list of files (in its order) and how they were read."""

    results: list[FileResult]
    shards: int = 0  # Ray tasks run (0: read in this process)


class HeaderReader(Protocol):
    """Reads the headers of ``files`` (absolute path, path relative to the root), in order."""

    def __call__(self, spec: ReadSpec, files: Sequence[tuple[Path, str]]) -> HeaderBatch: ...


def read_in_process(spec: ReadSpec, files: Sequence[tuple[Path, str]]) -> HeaderBatch:
    """The default ``HeaderReader``: every header read here, one file after the other."""
    return HeaderBatch([r for path, rel in files for r in read_file(spec, path, rel)])


def read_file(spec: ReadSpec, path: Path, rel: str) -> list[FileResult]:
    """The results of one file found under the root (an archive file: of its members)."""
    out: list[FileResult] = []  # an archive's members found before an error are kept
    try:
        if is_archive_name(path.name) and path.stat().st_size > 0:
            if spec.open_archives:
                _scan_archive(spec, path, rel, out)
            else:
                out.append(
                    FileResult(rel, "skipped", "archive file not opened (use --open-archives)")
                )
        else:
            out.append(_classify(spec, rel, file_source(path), None))
    except OSError as exc:
        out.append(FileResult(rel, "failed", f"cannot read file ({type(exc).__name__})"))
    except Exception as exc:  # noqa: BLE001 - one file never stops discovery
        out.append(FileResult(rel, "failed", unexpected(exc)))
    return out


def unexpected(exc: Exception) -> str:
    """The reason of an error no reader anticipated: its type only (messages may hold paths)."""
    return f"unreadable file ({type(exc).__name__})"


def _classify(spec: ReadSpec, rel: str, source: BinarySource, raw: bytes | None) -> FileResult:
    """Read one file's header (or say why it is skipped or failed)."""
    name = PurePosixPath(rel.split("!")[-1]).name
    low = name.lower()
    if name.startswith("."):
        return FileResult(rel, "skipped", "hidden file")
    if source.size == 0:
        return FileResult(rel, "failed", "empty file (0 bytes)")
    if is_nifti_name(low):
        try:
            return FileResult(rel, NIFTI, nifti=read_nifti_info(spec.root, rel, raw, spec.limits))
        except NiftiReadError as exc:
            return FileResult(rel, "failed", f"NIfTI: {exc}")
    if low.endswith(".json"):
        return FileResult(rel, "skipped", "metadata/sidecar file (.json), not an image")
    if low.endswith((".hdr", ".img")):
        return FileResult(rel, "skipped", "Analyze/NIfTI pair (.hdr/.img) not supported")
    try:
        header = read_header(source, rel, spec.limits)
    except DicomHeaderError as exc:
        if str(exc) == NOT_DICOM and not low.endswith(DICOM_SUFFIXES):
            suffix = PurePosixPath(low).suffix or "no extension"
            return FileResult(rel, "skipped", f"not a DICOM or NIfTI file ({suffix})")
        return FileResult(rel, "failed", str(exc))
    reason = skip_reason(header)
    if reason:
        return FileResult(rel, "skipped", reason)
    return FileResult(rel, HEADER, header=header)


def _scan_archive(spec: ReadSpec, path: Path, rel: str, out: list[FileResult]) -> None:
    """Every member of one archive into ``out``; a damaged member or archive is a failed
    result."""
    try:
        for member, size, read in iter_archive_members(path, spec.limits):
            member_rel = join_member(rel, member)
            if size == 0:
                out.append(FileResult(member_rel, "failed", "empty file (0 bytes)"))
                continue
            try:
                raw = read()
                out.append(_classify(spec, member_rel, bytes_source(raw), raw))
            except (ArchiveReadError, OverLimitError) as exc:
                out.append(FileResult(member_rel, "failed", str(exc)))
            except Exception as exc:  # noqa: BLE001 - one member never stops discovery
                out.append(FileResult(member_rel, "failed", unexpected(exc)))
    except ArchiveReadError as exc:
        out.append(FileResult(rel, "failed", str(exc)))


def folder_of(rel: str) -> str:
    """The folder of a file relative to the root ("." for the root)."""
    return str(PurePosixPath(rel).parent)


def plan_shards(
    rels: Sequence[str], max_files: int, folder: Callable[[str], str] = folder_of
) -> list[range]:
    """Cut walk-ordered files into shards: consecutive whole folders up to ``max_files`` files;
    a folder of more than ``max_files`` files is split into pieces of ``max_files``.

    Returns index ranges into ``rels``: in order, covering every file exactly once, so results
    merged shard after shard come in the order of the walk.
    """
    if max_files < 1:
        raise ValueError(f"max_files must be >= 1, got {max_files}")
    runs: list[range] = []  # one per folder (the walk gives a folder's files together)
    start = 0
    for i in range(1, len(rels) + 1):
        if i == len(rels) or folder(rels[i]) != folder(rels[start]):
            runs.extend(range(s, min(s + max_files, i)) for s in range(start, i, max_files))
            start = i
    shards: list[range] = []
    for run in runs:
        last = shards[-1] if shards else None
        if last is not None and len(last) + len(run) <= max_files:
            shards[-1] = range(last.start, run.stop)
        else:
            shards.append(run)
    return shards
