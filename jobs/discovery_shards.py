"""Discovery's header reads as Ray tasks sharded by folder; the driver only merges.

``ShardedHeaderReader`` is a ``pdd_batch.ingest.header_read.HeaderReader`` for
``discover_incremental``: the walk, the stat of every file and the index lookup stay on the
driver; the files whose headers must be read (new or changed, and the unchanged files of series
grouped again) go to Ray tasks when the run is on a cluster and there are enough of them:

- **when**: the run joins a cluster (``--address`` / ``RAY_ADDRESS``, or a Ray already
  connected) that has more than one alive node, and at least ``min_files`` headers are to be
  read (``RunConfig.discovery_shard_min_files``, default ``SHARD_MIN_FILES``: below it, starting
  tasks costs more than reading in process). A local run never starts Ray for discovery.
- **shards**: the files in the walk's order, cut by ``header_read.plan_shards``: consecutive
  whole folders up to ``max_files`` files (``SHARD_MAX_FILES``); a larger folder is split.
- **tasks**: one per shard, at most ``2 x CPUs`` in flight; each calls ``header_read.read_file``
  (the same pure function as the in-process path) on every file and returns its
  ``FileResult`` records: header facts only, no pixel data, no key (the site key stays on the
  driver). Every node must see the archive at the same path (as for the read tasks).
- **merge**: the driver adds the shards' results in shard order, i.e. in the walk's order, to
  the same ``Collector`` the in-process path fills, so series, keys, records and counts are
  identical.
- **failures**: Ray retries a task whose worker or node dies (``max_retries``). A shard that
  still fails does not lose its files: each becomes a failed record whose reason names the
  failure, marked ``retry`` so the file index forgets it and the next run reads it again.

Progress: ``discover`` events count shards done. Logs name counts and error types only.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import ray
from ray.exceptions import RayError

from jobs.cluster import ClusterInfo
from jobs.read_task import crash_once
from pdd_batch.ingest.header_read import (
    FileResult,
    HeaderBatch,
    ReadSpec,
    plan_shards,
    read_file,
    read_in_process,
)
from pdd_batch.runs.config import DISCOVERY_SHARD_FILES, DISCOVERY_SHARD_MIN_FILES
from pdd_batch.runs.lifecycle import emit
from pdd_batch.runs.run_types import ProgressFn

log = logging.getLogger(__name__)

SHARD_MIN_FILES = DISCOVERY_SHARD_MIN_FILES  # fewer headers to read: in process
SHARD_MAX_FILES = DISCOVERY_SHARD_FILES  # files per task
TASK_RETRIES = 3  # Ray's default for tasks whose worker dies
# Test-only fault injection (a marker-file path): the first shard task's worker dies once.
CRASH_ONCE_SHARD_ENV = "PDD_FAULT_CRASH_ONCE_SHARD"


def _read_shard(
    spec: dict, files: list[tuple[str, str]], crash_once_marker: str | None
) -> list[FileResult]:
    """Ray task: the ``FileResult``s of one shard's files, in order."""
    crash_once(crash_once_marker)
    read_spec = ReadSpec.from_dict(spec)
    return [r for path, rel in files for r in read_file(read_spec, Path(path), rel)]


def task_failed(files: Sequence[tuple[Path, str]], exc: Exception, tries: int) -> list[FileResult]:
    """The records of a shard whose task failed ``tries`` times: failed, read again next run."""
    reason = f"header read task failed ({type(exc).__name__}, {tries} tries); read again next run"
    return [FileResult(rel, "failed", reason, retry=True) for _, rel in files]


class ShardedHeaderReader:
    """Reads headers in Ray tasks sharded by folder when on a cluster (module docstring).

    Args:
        cluster: connects (once) and describes the cluster; called only when there are at
            least ``min_files`` headers to read.
        min_files: fewer headers than this are read in process.
        max_files: files per shard.
        max_retries: Ray retries of a shard task whose worker dies.
        progress: receives ``discover`` events (shards done of shards).
        min_nodes: alive nodes the cluster needs for tasks (2; the benchmark uses 1 to measure
            shard tasks on one machine's CPUs).
    """

    def __init__(
        self,
        cluster: Callable[[], ClusterInfo],
        *,
        min_files: int = SHARD_MIN_FILES,
        max_files: int = SHARD_MAX_FILES,
        max_retries: int = TASK_RETRIES,
        progress: ProgressFn | None = None,
        min_nodes: int = 2,
    ) -> None:
        self.cluster, self.min_files, self.max_files = cluster, min_files, max_files
        self.max_retries, self.progress, self.min_nodes = max_retries, progress, min_nodes

    def __call__(self, spec: ReadSpec, files: Sequence[tuple[Path, str]]) -> HeaderBatch:
        if len(files) < self.min_files:
            return read_in_process(spec, files)
        info = self.cluster()
        if info.nodes < self.min_nodes:
            return read_in_process(spec, files)
        return self._sharded(spec, files, max(2, int(2 * info.resources.get("CPU", 1))))

    def _sharded(
        self, spec: ReadSpec, files: Sequence[tuple[Path, str]], max_in_flight: int
    ) -> HeaderBatch:
        shards = plan_shards([rel for _, rel in files], self.max_files)
        log.info("discovery: %d header reads in %d shard task(s)", len(files), len(shards))
        task = ray.remote(_read_shard).options(num_cpus=1, max_retries=self.max_retries)
        args = (spec.to_dict(), os.environ.get(CRASH_ONCE_SHARD_ENV) or None)
        results: list[list[FileResult] | None] = [None] * len(shards)
        waiting = list(range(len(shards)))[::-1]  # popped from the end: shard 0 first
        running: dict[ray.ObjectRef, int] = {}
        done = 0
        while waiting or running:
            while waiting and len(running) < max_in_flight:
                i = waiting.pop()
                part = [(str(p), rel) for p, rel in (files[j] for j in shards[i])]
                running[task.remote(args[0], part, args[1])] = i
            ready, _ = ray.wait(list(running), num_returns=1)
            i = running.pop(ready[0])
            results[i] = self._collect(ready[0], [files[j] for j in shards[i]])
            done += 1
            emit(self.progress, "discover", done, len(shards), note="header shards")
        return HeaderBatch([r for part in results for r in part or ()], shards=len(shards))

    def _collect(self, ref: ray.ObjectRef, files: list[tuple[Path, str]]) -> list[FileResult]:
        """A finished shard's results; a failed one's files as failed records."""
        try:
            out = ray.get(ref)
        except RayError as exc:
            log.warning(
                "discovery: a header shard task failed (%s): its %d file(s) are failed records",
                type(exc).__name__,
                len(files),
            )
            return task_failed(files, exc, self.max_retries + 1)
        return out
