"""The screening job: discovery (incremental, ``pdd_batch.runs.discovery_index``; on a
cluster its header reads run as Ray tasks sharded by folder, ``jobs.discovery_shards``, and the
driver merges) -> the Ray graph (``jobs.graph``; a model set: ``jobs.model_set``) -> streaming,
atomic Parquet writes with per-series commits (``pdd_batch.runs.sink`` and
``pdd_batch.runs.state``) into a hidden store, made live when the run ends. The run's
bookkeeping without Ray is ``pdd_batch.runs.lifecycle``; its types are
``pdd_batch.runs.run_types``.

A run that replaces earlier results (``--force``, another checkpoint or site key) publishes only
when it completes: failed or killed, it leaves the earlier results (and their manifest fields).

Progress goes to an optional callback (``ProgressEvent``); nothing here prints.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from contextlib import ExitStack
from dataclasses import replace
from pathlib import Path
from typing import Any

import ray

from jobs.cluster import ClusterInfo, connect
from jobs.discovery_shards import ShardedHeaderReader
from jobs.graph import (  # noqa: F401 - re-exported
    CRASH_ONCE_ENV,
    CRASH_ONCE_READ_ENV,
    build_dataset,
    stable_shard,
)
from jobs.model_set import resolve_model, resolve_models, routed_dataset  # noqa: F401
from jobs.ray_logs import ray_logs_to
from jobs.resources import plan_actors
from pdd_batch.ingest import keys
from pdd_batch.ingest.header_read import HeaderReader, read_in_process
from pdd_batch.ingest.series import FileRecord, SeriesRef
from pdd_batch.runs.config import RunConfig
from pdd_batch.runs.crosswalk import check_location, write_crosswalk
from pdd_batch.runs.discovery_index import discover_indexed
from pdd_batch.runs.lifecycle import (  # noqa: F401 - series_fingerprint re-exported
    bind,
    emit,
    fail,
    finalise,
    model_fields,
    part_names,
    plan_work,
    route,
    running_manifest,
    series_fingerprint,
)
from pdd_batch.runs.manifest import STATUS_COMPLETE, code_version, write_manifest
from pdd_batch.runs.run_types import (  # noqa: F401 - re-exported: the job's API
    ModelInfo,
    ProgressEvent,
    ProgressFn,
    RunContext,
    ScreenResult,
)
from pdd_batch.runs.sink import Provenance, SinkStats, SliceSink
from pdd_batch.runs.state import RunState, make_run_folder_private, run_lock

log = logging.getLogger(__name__)


def _stream(
    ds: ray.data.Dataset, sink: SliceSink, units: list[SeriesRef], progress: ProgressFn | None
) -> None:
    n_series = len(units)
    n_slices = sum(r.n_slices for r in units) or None  # discovery's estimate
    t0 = time.perf_counter()
    seen: set[str] = set()
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
        sink.add(batch)
        seen.update(str(k) for k in batch["series_key"])
        elapsed = max(time.perf_counter() - t0, 1e-9)
        rate = sink.stats.slices_received / elapsed
        emit(progress, "series", len(seen), n_series)
        total = max(n_slices, sink.stats.slices_received) if n_slices else None
        emit(progress, "slices", sink.stats.slices_received, total, rate)
    sink.close()


class _LazyCluster:
    """The run's Ray connection, made on first use (discovery's shard tasks, or the graph) and
    kept until ``close``; meanwhile Ray's log lines go to the run folder (``ray_logs_to``)."""

    def __init__(self, cfg: RunConfig) -> None:
        self.cfg, self.info = cfg, None
        self._stack = ExitStack()

    def get(self) -> ClusterInfo:
        if self.info is None:
            self._stack.enter_context(ray_logs_to(self.cfg.out_dir / "_logs"))
            self.info = self._stack.enter_context(
                connect(self.cfg.resolved_address, num_cpus=self.cfg.num_cpus)
            )
        return self.info

    def close(self) -> None:
        self._stack.close()


def _header_reader(
    cfg: RunConfig, cluster: _LazyCluster, progress: ProgressFn | None
) -> HeaderReader:
    """Shard tasks when the run joins a cluster (an address, or a Ray already connected; the
    reader checks for more than one node and enough files); a local run reads in process and
    starts no Ray for discovery."""
    if not (cfg.resolved_address or ray.is_initialized()):
        return read_in_process
    return ShardedHeaderReader(
        cluster.get,
        min_files=cfg.discovery_shard_min_files,
        max_files=cfg.discovery_shard_files,
        progress=progress,
    )


def run_screen(
    cfg: RunConfig,
    progress: ProgressFn | None = None,
    crosswalk: Path | None = None,
    source_errors: Sequence[FileRecord] = (),
    source_summary: Mapping[str, Any] | None = None,
) -> ScreenResult:
    """Screen ``cfg.archive`` into ``cfg.out_dir`` (one run per folder at a time).

    Args:
        cfg: the run configuration.
        progress: receives ``ProgressEvent``s.
        crosswalk: also write the file/series/study key -> path and UID table here (mode 0600,
            outside the run folder; ``pdd_batch.crosswalk``).
        source_errors: inputs a source stage lost before discovery (a PACS series whose
            WADO-RS retrieve failed, see ``jobs.dicomweb_fetch``): each becomes an error row
            and counts as a failed input.
        source_summary: what the source stage did (a PACS screen: server kind, cursor,
            fetch counts), recorded as the manifest's ``pacs`` section.

    Raises:
        RunLockedError: another run holds the folder.
        SiteKeyError: the site key cannot be created or is not private.
        CrosswalkError: the crosswalk is inside the run folder or cannot be written.
    """
    keys.site_key()  # fail before any work on a key file that is unsafe
    if crosswalk is not None:
        check_location(crosswalk, cfg.out_dir)
    make_run_folder_private(cfg.out_dir)  # 0700 / 0600 whatever the umask
    with run_lock(cfg.out_dir):
        return _run_locked(cfg, progress, crosswalk, source_errors, source_summary)


def _prepare(
    cfg: RunConfig,
    progress: ProgressFn | None,
    crosswalk: Path | None,
    source_errors: Sequence[FileRecord],
    cluster: _LazyCluster,
) -> RunContext:
    """State reconciled, model bound, archive discovered, work planned, sink ready."""
    t_start = time.perf_counter()
    key_id = keys.site_key().key_id
    state = RunState.load(cfg.out_dir)
    state.reconcile()
    models, model = resolve_models(cfg)
    warnings, published_manifest = bind(
        cfg, state, model, key_id, progress, single=len(models) == 1
    )
    t = time.perf_counter()
    disc, discovery_stats = discover_indexed(  # headers of new or changed files only
        state,
        cfg.archive,
        open_archives=cfg.open_archives,
        limits=cfg.limits,
        follow_links_outside=cfg.follow_links_outside,
        read_headers=_header_reader(cfg, cluster, progress),
    )
    disc.files.extend(source_errors)
    discover_s = time.perf_counter() - t
    routed = route(disc, models, state, cfg)
    disc = routed.disc
    emit(progress, "discover", len(disc.files), len(disc.files), note=f"{len(disc.series)} series")
    if crosswalk is not None:
        write_crosswalk(crosswalk, disc, key_id)
    pending, fingerprints = plan_work(cfg, disc, state)
    prov = Provenance(
        model.model_id,
        model.checkpoint_hash,
        model.preprocessing,
        cfg.run_id,
        code_version(),
        model.threshold,
        model.ood_threshold,
    )
    n_pending = len(pending)

    def on_commit(stats: SinkStats) -> None:
        emit(progress, "commit", stats.series_committed, n_pending)

    sink = SliceSink(
        state,
        prov,
        {r.series_key: r for r in pending},
        fingerprints,
        part_names(cfg.run_id),
        rows_per_file=cfg.rows_per_file,
        flush_seconds=cfg.flush_seconds,
        on_commit=on_commit,
        models={m.model_id: replace(prov, **model_fields(m)) for m in models}
        if len(models) > 1
        else None,
    )
    run = RunContext(cfg, state, model, disc, pending, sink, progress, t_start, key_id=key_id)
    run.models, run.routed = models, routed
    run.source_failed = len(source_errors)
    run.timings["discover_s"] = discover_s
    run.discovery = discovery_stats
    run.warnings, run.published_manifest = warnings, published_manifest
    run.manifest = running_manifest(run)
    write_manifest(cfg.out_dir, run.manifest)
    return run


def _dataset(run: RunContext, cluster: ClusterInfo) -> ray.data.Dataset:
    """The graph: one model as before, or one branch (and actor pool) per model of a set."""
    cfg = run.cfg
    if len(run.models) > 1:
        return routed_dataset(run, cluster.resources)
    plan = plan_actors(cluster.resources, num_actors=cfg.num_actors, batch_size=cfg.batch_size)
    return build_dataset(
        run.pending,
        run.disc.root,
        run.model,
        plan,
        precision=cfg.precision,
        teacher_weights=cfg.teacher_weights,
        limits=cfg.limits,
    )


def _run_locked(
    cfg: RunConfig,
    progress: ProgressFn | None,
    crosswalk: Path | None = None,
    source_errors: Sequence[FileRecord] = (),
    source_summary: Mapping[str, Any] | None = None,
) -> ScreenResult:
    cluster = _LazyCluster(cfg)
    try:
        run = _prepare(cfg, progress, crosswalk, source_errors, cluster)
    except BaseException:
        cluster.close()
        raise
    run.source_summary = dict(source_summary) if source_summary else None
    t = time.perf_counter()
    try:
        try:
            if not run.pending:
                note = "nothing new: all series screened earlier"
                if run.source_failed:  # not "all": some could not be fetched
                    note = f"nothing to screen: {run.source_failed} series could not be fetched"
                for stage in ("series", "slices", "commit"):
                    emit(progress, stage, 0, 0, note=note)
            else:
                run.cluster = cluster.get()
                _stream(_dataset(run, run.cluster), run.sink, run.pending, progress)
        finally:
            run.cluster = cluster.info  # None when Ray was never needed
            cluster.close()
    except BaseException as exc:  # the run failed: keep what is committed, say so, re-raise
        run.timings["pipeline_s"] = time.perf_counter() - t
        fail(run, exc)
        raise
    run.timings["pipeline_s"] = time.perf_counter() - t
    return finalise(run, STATUS_COMPLETE, None)
