"""Incremental discovery: a file index (file key -> size, mtime, outcome, series) lets a nightly
run read the headers of new or changed files only; an unchanged file costs a ``stat``.

This layer wraps ``discovery`` (same walk, same per-file reader, same grouping) and changes
none of it. A file is *unchanged* when its size and modification time (ns) are those the index
holds. Grouping needs every header of a series, so a series whose files changed, vanished or
gained a new file is grouped again from its headers: the headers of its unchanged files are
read again too (identified by the keyed ``group`` token of their study and series UIDs). Every
other series is rebuilt from the index without opening a file. Members of .zip/.tar files are
not indexed (their container is read each time); a NIfTI file is read again when its sidecar
.json changed.

The index holds no path or UID (file keys, keyed tokens, path-free reasons); it is persisted by
the run store (``pdd_batch.runs.discovery_index``).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from pdd_batch.ingest.archive_io import IngestLimits, is_archive_name
from pdd_batch.ingest.discovery import (
    Collector,
    DiscoveryError,
    discover,
    group_collected,
    walk_files,
)
from pdd_batch.ingest.header_read import HeaderReader, ReadSpec, read_in_process
from pdd_batch.ingest.keys import KEY_LENGTH, file_key, redact_paths, series_key, site_key
from pdd_batch.ingest.series import Discovery, FileRecord, SeriesRef


@dataclass(frozen=True)
class IndexEntry:
    """What the index knows of one file (by file key)."""

    size: int
    mtime_ns: int
    status: str
    reason: str
    series_key: str | None
    token: str | None  # keyed token of its (study, series) UIDs: DICOM files only
    position: int  # its place in its series' files


@dataclass
class FileIndex:
    """The index as loaded (``files`` by file key, ``series`` refs without ``files``)."""

    files: dict[str, IndexEntry] = field(default_factory=dict)
    series: dict[str, dict] = field(default_factory=dict)


@dataclass
class IndexUpdate:
    """What a discovery changes in the index, and what it cost."""

    files: dict[str, IndexEntry] = field(default_factory=dict)
    removed_files: list[str] = field(default_factory=list)
    series: dict[str, dict] = field(default_factory=dict)
    removed_series: list[str] = field(default_factory=list)
    header_reads: int = 0
    files_unchanged: int = 0
    shards: int = 0  # Ray tasks that read headers (0: all read in this process)


@dataclass
class _Seen:
    """One file found by the walk."""

    path: Path
    rel: str
    key: str
    size: int
    mtime_ns: int


def _file_keys() -> Callable[[str], str]:
    """``keys.file_key`` with the site key looked up once (not once per file)."""
    key = site_key()
    return lambda rel: key.digest("file", "file", rel, length=KEY_LENGTH)


def _stat(path: Path, rel: str, key_of: Callable[[str], str]) -> _Seen:
    try:
        st = path.stat()
        size, mtime = st.st_size, st.st_mtime_ns
    except OSError:
        size, mtime = -1, -1  # read, and recorded as failed, by the reader
    return _Seen(path, rel, key_of(rel), size, mtime)


def _nifti_stem(rel: str) -> str | None:
    low = rel.lower()
    for suffix in (".nii.gz", ".nii"):
        if low.endswith(suffix):
            return rel[: -len(suffix)]
    return None


def _split(seen: list[_Seen], index: FileIndex) -> tuple[list[_Seen], list[_Seen]]:
    """(unchanged, to read) files of the walk."""
    unchanged, to_read = [], []
    for s in seen:
        e = index.files.get(s.key)
        same = e is not None and (e.size, e.mtime_ns) == (s.size, s.mtime_ns) and s.size >= 0
        if same and e.status == "used" and e.series_key not in index.series:
            same = False  # its series is not in the index: read it again
        if same and not is_archive_name(s.path.name):
            unchanged.append(s)
        else:
            to_read.append(s)
    # a NIfTI whose sidecar .json is new, changed or gone is read again (modality, body part)
    changed = {file_key(s.rel) for s in to_read if s.rel.lower().endswith(".json")}
    changed |= set(index.files) - {s.key for s in seen}
    again = []
    for s in unchanged:
        stem = _nifti_stem(s.rel)
        if stem is not None and file_key(stem + ".json") in changed:
            again.append(s)
    return [s for s in unchanged if s not in again], to_read + again


def _tokens(col: Collector) -> dict[str, str]:
    """rel -> group token of every DICOM header collected."""
    out = {}
    for (study, series), headers in col.dicom.items():
        token = series_key(study, series)
        for h in headers:
            out[h.file] = token
    return out


def discover_incremental(
    archive: Path,
    index: FileIndex,
    *,
    open_archives: bool = False,
    limits: IngestLimits | None = None,
    follow_links_outside: bool = False,
    read_headers: HeaderReader = read_in_process,
) -> tuple[Discovery, IndexUpdate]:
    """``discover(archive)`` reading only the headers the index cannot answer for.

    ``read_headers`` reads them (in this process by default; ``jobs.discovery_shards`` in Ray
    tasks): it is called at most twice, with the new or changed files, then with the unchanged
    files of series that must be grouped again, and never with an empty list.

    Returns the discovery (the same series and records a full ``discover`` finds) and the
    changes to store in the index (with ``header_reads``, ``files_unchanged`` and ``shards``).
    """
    archive = Path(archive)
    if not archive.exists():
        raise DiscoveryError(f"archive not found: {archive.name}")
    if not archive.is_dir():  # one file: nothing to save
        disc = discover(archive, open_archives=open_archives, limits=limits)
        return disc, IndexUpdate(header_reads=len(disc.files))
    col = Collector(archive, limits or IngestLimits(), follow_links_outside)
    key_of = _file_keys()
    seen = [_stat(p, p.relative_to(archive).as_posix(), key_of) for p in walk_files(archive, col)]
    unchanged, to_read = _split(seen, index)
    update = IndexUpdate()
    spec = ReadSpec(archive, open_archives, col.limits)
    _read(col, update, read_headers, spec, to_read)
    dirty = _dirty_tokens(index, seen, to_read, _tokens(col))
    reread = [s for s in unchanged if index.files[s.key].token in dirty]
    _read(col, update, read_headers, spec, reread)
    update.header_reads = len(to_read) + len(reread)
    disc = group_collected(col)
    rebuilt = list(disc.series)
    kept = [s for s in unchanged if index.files[s.key].token not in dirty]
    update.files_unchanged = len(kept)
    _add_kept(disc, kept, index)
    read = [s for s in [*to_read, *reread] if s.rel not in col.retry]
    _record_update(update, disc, rebuilt, read, _tokens(col))
    walked = {s.key for s in seen}
    update.removed_files = [k for k in index.files if k not in walked]
    # a file the reading machinery failed on is read again next time, not remembered
    update.removed_files += [s.key for s in to_read + reread if s.rel in col.retry]
    present = {r.series_key for r in disc.series}
    update.removed_series = [k for k in index.series if k not in present]
    return disc, update


def _read(
    col: Collector,
    update: IndexUpdate,
    read_headers: HeaderReader,
    spec: ReadSpec,
    files: list[_Seen],
) -> None:
    """Read the headers of ``files`` into ``col`` (in the walk's order)."""
    if not files:
        return
    batch = read_headers(spec, [(s.path, s.rel) for s in files])
    col.add(batch.results)
    update.shards += batch.shards


def _dirty_tokens(
    index: FileIndex, seen: list[_Seen], to_read: list[_Seen], tokens: Mapping[str, str]
) -> set[str]:
    """Groups to build again: of files read now, and of indexed files changed or gone."""
    dirty = {tokens[s.rel] for s in to_read if s.rel in tokens}
    walked = {s.key for s in seen}
    for s in to_read:
        old = index.files.get(s.key)
        if old is not None and old.token:
            dirty.add(old.token)
    for key, entry in index.files.items():
        if key not in walked and entry.token:
            dirty.add(entry.token)
    return dirty


def _add_kept(disc: Discovery, kept: list[_Seen], index: FileIndex) -> None:
    """Records and series of the unchanged files outside rebuilt groups, from the index."""
    files_of: dict[str, list[tuple[int, str]]] = defaultdict(list)
    for s in kept:
        e = index.files[s.key]
        disc.files.append(FileRecord(s.rel, e.status, e.reason, e.series_key))
        if e.series_key and e.status == "used":
            files_of[e.series_key].append((e.position, s.rel))
    for key, files in files_of.items():
        ref = index.series.get(key)
        if ref is not None:
            disc.series.append(SeriesRef.from_dict({**ref, "files": [r for _, r in sorted(files)]}))


def _record_update(
    update: IndexUpdate,
    disc: Discovery,
    rebuilt: list[SeriesRef],
    read: list[_Seen],
    tokens: Mapping[str, str],
) -> None:
    """Index entries of the files read now and of the series grouped from their headers."""
    records = {r.path: r for r in disc.files}
    position = {f: i for ref in rebuilt for i, f in enumerate(ref.files)}
    for s in read:
        r = records.get(s.rel)
        if r is None:
            continue
        reason = redact_paths(r.reason, [s.rel]) if r.reason else ""
        update.files[s.key] = IndexEntry(
            s.size, s.mtime_ns, r.status, reason, r.series_key, tokens.get(s.rel),
            position.get(s.rel, 0),
        )  # fmt: skip
    for ref in rebuilt:
        if not any("!" in f for f in ref.files):  # archive members are never indexed
            update.series[ref.series_key] = {k: v for k, v in ref.to_dict().items() if k != "files"}
