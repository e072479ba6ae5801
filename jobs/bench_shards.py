"""`pdd-batch bench ingest --sharded-files N`: the first discovery of an archive of ``N`` small
synthetic CT files (every header read), in process against Ray shard tasks
(``jobs.discovery_shards``) on a local cluster of ``--num-cpus`` CPUs (one node: the reader is
told to shard anyway). Both must find the same series and records; the figures printed are
measured (median of ``repeats`` after a first pass each, which warms the page cache and
starts the workers). Last line: ``discovery sharded/in-process: X.XX`` (time ratio; < 1 is
faster sharded)."""

from __future__ import annotations

import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from jobs.cluster import connect
from jobs.discovery_shards import SHARD_MAX_FILES, ShardedHeaderReader
from pdd_batch.ingest.file_index import FileIndex, discover_incremental
from pdd_batch.ingest.header_read import HeaderReader, read_in_process
from pdd_batch.runs.bench_discovery import write_archive


def _view(disc) -> tuple[list, list]:
    return (
        [repr(r.to_dict()) for r in disc.series],
        [(f.path, f.status, f.reason, f.series_key) for f in disc.files],
    )


def _timed(archive: Path, reader: HeaderReader, repeats: int) -> tuple[float, float, tuple, int]:
    """Seconds of the untimed-for-the-median first pass, median seconds of the next
    ``repeats`` discoveries (no index) with ``reader``, the discovery's view and its shards."""
    t = time.perf_counter()
    disc, update = discover_incremental(archive, FileIndex(), read_headers=reader)  # warm-up
    first = time.perf_counter() - t
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        discover_incremental(archive, FileIndex(), read_headers=reader)
        times.append(time.perf_counter() - t)
    return first, statistics.median(times), _view(disc), update.shards


def run_shard_benchmark(
    print_fn: Callable[[str], None] = print,
    n_files: int = 20_000,
    num_cpus: int = 2,
    shard_files: int = SHARD_MAX_FILES,
    repeats: int = 3,
) -> float:
    """Print in-process and sharded discovery figures; returns the time ratio."""
    with tempfile.TemporaryDirectory(prefix="pdd-shards-") as tmp:
        archive = Path(tmp) / "archive"
        write_archive(archive, n_files)
        _, local_s, local_view, _ = _timed(archive, read_in_process, repeats)
        print_fn(f"in-process discovery of {n_files:,} files: {local_s:.2f} s "
                 f"({n_files / local_s:,.0f} files/s)")  # fmt: skip
        with connect(None, num_cpus=num_cpus) as info:
            reader = ShardedHeaderReader(lambda: info, min_files=0, max_files=shard_files,
                                         min_nodes=1)  # fmt: skip
            first_s, shard_s, shard_view, shards = _timed(archive, reader, repeats)
    if shard_view != local_view:
        raise RuntimeError("sharded discovery differs from the in-process one")
    print_fn(f"sharded discovery ({shards} tasks of <= {shard_files} files, "
             f"{num_cpus} CPUs): {shard_s:.2f} s ({n_files / shard_s:,.0f} files/s), "
             f"same series and records; first pass, workers starting: {first_s:.2f} s")  # fmt: skip
    ratio = shard_s / local_s
    print_fn(f"discovery sharded/in-process: {ratio:.2f}")
    return ratio
