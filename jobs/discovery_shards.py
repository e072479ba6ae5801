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
  still fails is split in two and both halves run again, down to single files: a file that
  kills every worker reading it ends alone as a failed record whose reason names the failure
  (marked ``retry``: the file index forgets it, the next run reads it again); the other files
  of its shard are read. No file is lost.

Progress: ``discover`` events count shards done. Logs name counts and error types only.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path, PurePosixPath

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
# Test-only fault injection: a marker-file path (the first shard task's worker dies once), and
# a file name (every worker asked to read a file of that name dies).
CRASH_ONCE_SHARD_ENV = "PDD_FAULT_CRASH_ONCE_SHARD"
CRASH_ON_FILE_ENV = "PDD_FAULT_CRASH_ON_FILE"


def _read_shard(spec: dict, files: list[tuple[str, str]], faults: dict) -> list[FileResult]:
    """Ray task: the ``FileResult``s of one shard's files, in order."""
    crash_once(faults.get("crash_once"))
    if faults.get("crash_on") in {PurePosixPath(rel).name for _, rel in files}:
        os._exit(1)  # test-only: a file that kills every worker reading it
    read_spec = ReadSpec.from_dict(spec)
    return [r for path, rel in files for r in read_file(read_spec, Path(path), rel)]


def task_failed(files: Sequence[tuple[Path, str]], exc: Exception, tries: int) -> list[FileResult]:
    """The record of a file whose header task failed ``tries`` times: failed, read again next
    run (the index does not keep it)."""
    reason = f"header read task failed ({type(exc).__name__}, {tries} tries); read again next run"
    return [FileResult(rel, "failed", reason, retry=True) for _, rel in files]


def _faults() -> dict:
    """Test-only fault injection, from the driver's environment."""
    return {
        "crash_once": os.environ.get(CRASH_ONCE_SHARD_ENV) or None,
        "crash_on": os.environ.get(CRASH_ON_FILE_ENV) or None,
    }


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
        """Shard tasks, at most ``max_in_flight`` at a time; a task that fails after Ray's
        retries is split in two and both halves run again, down to single files, so a file that
        kills its worker fails alone (``task_failed``) and the others of its shard are read."""
        shards = plan_shards([rel for _, rel in files], self.max_files)
        log.info("discovery: %d header reads in %d shard task(s)", len(files), len(shards))
        task = ray.remote(_read_shard).options(num_cpus=1, max_retries=self.max_retries)
        spec_d, faults = spec.to_dict(), _faults()
        owner = {j: i for i, r in enumerate(shards) for j in r}  # file index -> its shard
        left = [len(r) for r in shards]  # files of each shard not yet merged
        parts: dict[int, list[FileResult]] = {}  # by first file index: merged in walk order
        waiting = shards[::-1]  # popped from the end: shard 0 first
        running: dict[ray.ObjectRef, range] = {}
        done = 0
        while waiting or running:
            while waiting and len(running) < max_in_flight:
                r = waiting.pop()
                part = [(str(files[j][0]), files[j][1]) for j in r]
                running[task.remote(spec_d, part, faults)] = r
            ready, _ = ray.wait(list(running), num_returns=1)
            r = running.pop(ready[0])
            try:
                parts[r.start] = ray.get(ready[0])
            except RayError as exc:
                if len(r) > 1:  # read both halves again: one file may be the cause
                    mid = r.start + len(r) // 2
                    waiting += [range(mid, r.stop), range(r.start, mid)]
                    log.warning("discovery: a header task failed (%s); split in two and "
                                "retried", type(exc).__name__)  # fmt: skip
                    continue
                n_tries = self.max_retries + 1
                log.warning(
                    "discovery: one file's header task failed (%s) %d times; it is a failed record",
                    type(exc).__name__,
                    n_tries,
                )
                parts[r.start] = task_failed([files[r.start]], exc, n_tries)
            left[owner[r.start]] -= len(r)
            if left[owner[r.start]] == 0:
                done += 1
                emit(self.progress, "discover", done, len(shards), note="header shards")
        results = [x for start in sorted(parts) for x in parts[start]]
        return HeaderBatch(results, shards=len(shards))
