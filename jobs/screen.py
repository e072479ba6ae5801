"""The screening job: discovery on the driver -> series work units sharded by a stable hash ->
Ray CPU read tasks (decode, window, slice) -> actor pool holding the PDD model -> streaming,
atomic Parquet writes with per-series commits (see ``pdd_batch.runs.sink`` and
``pdd_batch.runs.state``) into a hidden store, published into ``slices/`` (one rename) when the
run ends.

A run that replaces earlier results (``--force``, another checkpoint or site key) publishes only
when it completes: failed or killed, it leaves the earlier results (and their manifest fields).

Progress goes to an optional callback (``ProgressEvent``); nothing here prints.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import ray

from jobs.cluster import ClusterInfo, connect
from jobs.model_set import model_summaries, resolve_models, routed_dataset
from jobs.predictor import SlicePredictor, encode_heatmaps_fn
from jobs.ray_logs import ray_logs_to
from jobs.read_task import failure_reason, read_series_fn
from jobs.resources import ActorPlan, plan_actors
from pdd_batch.evaluation.site_calibration import SOURCE_NONE, threshold_source
from pdd_batch.ingest import keys
from pdd_batch.ingest.archive_io import IngestLimits, split_member
from pdd_batch.ingest.discovery import Discovery, FileRecord, SeriesRef, discover
from pdd_batch.ingest.scope import UNKNOWN_SCOPE, ModelScope, Routed
from pdd_batch.runs.config import RunConfig
from pdd_batch.runs.crosswalk import check_location, write_crosswalk
from pdd_batch.runs.manifest import (
    STATUS_COMPLETE,
    STATUS_FAILED,
    STATUS_INCOMPLETE,
    STATUS_RUNNING,
    InputCounts,
    build_manifest,
    code_version,
    exit_code_for,
    file_outcomes,
    record_failure,
    scrub_paths,
    write_manifest,
)
from pdd_batch.runs.results import ResultsError, read_manifest
from pdd_batch.runs.sink import Provenance, SinkStats, SliceSink
from pdd_batch.runs.state import RunState, make_run_folder_private, run_lock
from pdd_batch.runs.tables import write_errors, write_studies

log = logging.getLogger(__name__)

# Test-only fault injection (a marker-file path each): an actor / a read worker dies once.
CRASH_ONCE_ENV = "PDD_FAULT_CRASH_ONCE"
CRASH_ONCE_READ_ENV = "PDD_FAULT_CRASH_ONCE_READ"
ROWS_PER_BLOCK = 32
MAX_INPUT_BLOCKS = 2000


@dataclass(frozen=True)
class ProgressEvent:
    """One progress update: ``stage`` is discover | series | slices | commit | finalise, or
    warning (``note``: a message for the user, e.g. what this run will replace)."""

    stage: str
    done: int
    total: int | None = None
    rate: float | None = None  # per second, for "slices"
    note: str = ""


ProgressFn = Callable[[ProgressEvent], None]


@dataclass(frozen=True)
class ScreenResult:
    """Outcome of ``run_screen``: the manifest written, the process exit code and the warnings
    given (also sent as ``warning`` progress events)."""

    out_dir: Path
    status: str
    exit_code: int
    manifest: dict[str, Any]
    warnings: tuple[str, ...] = ()


@dataclass(frozen=True)
class ModelInfo:
    path: Path
    model_id: str
    checkpoint_hash: str
    preprocessing: str  # JSON
    threshold: float | None
    scope: ModelScope = UNKNOWN_SCOPE
    ood_threshold: float | None = None  # the in-distribution check's, when it has one
    ood_sha256: str | None = None
    threshold_source: str = SOURCE_NONE  # "site", "development set" or "uncalibrated"


def resolve_model(path: Path | None, teacher_weights: dict[str, str] | None = None) -> ModelInfo:
    """Read the checkpoint's metadata on the driver (each actor loads and verifies the weights).

    Teacher weight files it refers to must exist here (on a cluster: the same path on every
    node, i.e. shared storage), so a moved file fails the run at once with what to do.
    """
    from model.checkpoint import check_teacher_files, read_meta

    if path is None:
        from model.default import default_model_path

        path = default_model_path()
    check_teacher_files(Path(path), teacher_weights)
    meta = read_meta(Path(path))
    calib = meta.get("calibration") or {}
    threshold = calib.get("threshold")
    return ModelInfo(
        path=Path(path),
        model_id=str(meta["model_id"]),
        checkpoint_hash=str(meta["checkpoint_hash"]),
        preprocessing=json.dumps(meta["preprocessing"], sort_keys=True),
        threshold=None if threshold is None else float(threshold),
        scope=ModelScope.from_dict(meta.get("scope")),
        ood_threshold=float(meta["ood"]["threshold"]) if meta.get("ood") else None,
        ood_sha256=str(meta["ood"]["sha256"]) if meta.get("ood") else None,
        threshold_source=threshold_source(calib),
    )


def stable_shard(series_key: str, n_shards: int) -> int:
    """Shard of a series: SHA-256 of its key (stable across runs and machines)."""
    return int(hashlib.sha256(series_key.encode()).hexdigest()[:12], 16) % n_shards


def series_fingerprint(root: Path, ref: SeriesRef) -> str:
    """Keyed digest of a series' files (relative paths, sizes and modification times): changes
    when its inputs change, a same-size rewrite included. Keyed (``keys``), as it is stored in
    the run state and digests the paths.

    Members of .zip/.tar files count with the size and time of the archive file that holds them.
    """
    h = hashlib.sha256()
    for rel in sorted((*ref.files, *ref.spares)):  # a spare may give a slice: it counts too
        container, member = split_member(rel)  # a .zip/.tar member: its container's stat
        try:
            st = (root / (container if member else rel)).stat()
            size, mtime = st.st_size, st.st_mtime_ns
        except OSError:
            size, mtime = -1, -1
        h.update(f"{rel}\0{size}\0{mtime}\n".encode())
    return keys.hash_key(h.hexdigest(), length=32, purpose="fingerprint")


def _part_names(run_id: str) -> Iterator[str]:
    i = 0
    while True:
        i += 1
        yield f"part-{run_id}-{i:05d}.parquet"


def _emit(progress: ProgressFn | None, *args: Any, **kwargs: Any) -> None:
    if progress is not None:
        progress(ProgressEvent(*args, **kwargs))


def build_dataset(
    units: list[SeriesRef],
    root: Path,
    model: ModelInfo,
    plan: ActorPlan,
    precision: str = "fp32",
    teacher_weights: dict[str, str] | None = None,
    limits: IngestLimits | None = None,
) -> ray.data.Dataset:
    """The Ray Data graph: work units -> read tasks -> actor pool -> PNG encoding (numpy rows).

    ``precision`` is the actors' forward precision ("fp32" | "bf16", ``model.precision``);
    ``teacher_weights`` where the checkpoint's teacher weight files are now, by role (optional);
    ``limits`` the ingest caps the read tasks apply (default ``IngestLimits()``).

    Fault tolerance comes from Ray Data's defaults, which this graph relies on (passing them as
    ``ray_remote_args`` is deprecated in Ray 2.60): pool actors get ``max_restarts=-1`` and
    ``max_task_retries=-1`` (a killed actor is restarted and its batch retried), read tasks Ray's
    ``max_retries=3`` for worker crashes. The sink drops any row it already has, so a retried
    block can never duplicate a slice.
    """
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.execution_options.preserve_order = False
    n_blocks = max(1, min(len(units), MAX_INPUT_BLOCKS))
    ordered = sorted(units, key=lambda r: (stable_shard(r.series_key, n_blocks), r.series_key))
    items = [{"series": json.dumps(r.to_dict(), sort_keys=True)} for r in ordered]
    ds = ray.data.from_items(items, override_num_blocks=n_blocks)
    ds = ds.map_batches(
        read_series_fn,
        fn_kwargs={
            "archive_root": str(root),
            "preprocessing": model.preprocessing,
            "rows_per_block": ROWS_PER_BLOCK,
            "crash_once_marker": os.environ.get(CRASH_ONCE_READ_ENV) or None,
            "limits": json.dumps((limits or IngestLimits()).to_dict()),
            # stacks are matched by series key: workers get that sub-key, nothing more
            "series_subkey": keys.site_key().export_scoped("series"),
        },
        batch_size=1,
        batch_format="numpy",
        num_cpus=plan.read_cpus,
    )
    scored = ds.map_batches(
        SlicePredictor,
        fn_constructor_kwargs={
            "checkpoint": str(model.path.resolve()),
            "device": plan.device,
            "torch_threads": plan.torch_threads,
            "precision": precision,
            "teacher_weights": teacher_weights or None,
            "crash_once_marker": os.environ.get(CRASH_ONCE_ENV) or None,
        },
        batch_size=plan.batch_size,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=plan.num_actors),
        num_cpus=plan.num_cpus,
        num_gpus=plan.num_gpus,
        memory=plan.memory,
    )
    # PNG encoding off the model actors, on any free CPU (it capped GPU actors, see predictor)
    return scored.map_batches(encode_heatmaps_fn, batch_format="numpy", num_cpus=plan.read_cpus)


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
        _emit(progress, "series", len(seen), n_series)
        total = max(n_slices, sink.stats.slices_received) if n_slices else None
        _emit(progress, "slices", sink.stats.slices_received, total, rate)
    sink.close()


def _plan_work(cfg: RunConfig, disc: Discovery, state: RunState) -> tuple[list[SeriesRef], dict]:
    fingerprints = {r.series_key: series_fingerprint(disc.root, r) for r in disc.series}
    fp = fingerprints
    pending = [r for r in disc.series if not state.is_done(r.series_key, fp[r.series_key])]
    changed = [r.series_key for r in pending if r.series_key in state.series]
    if changed:
        log.info("%d series changed since they were screened; replacing their rows", len(changed))
        state.forget(changed)
    return pending, fingerprints


def run_screen(
    cfg: RunConfig,
    progress: ProgressFn | None = None,
    crosswalk: Path | None = None,
    source_errors: Sequence[FileRecord] = (),
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
        return _run_locked(cfg, progress, crosswalk, source_errors)


@dataclass
class _Run:
    """What one run carries from preparation to the final manifest."""

    cfg: RunConfig
    state: RunState
    model: ModelInfo
    disc: Discovery
    pending: list[SeriesRef]
    sink: SliceSink
    progress: ProgressFn | None
    t_start: float
    timings: dict[str, float] = field(default_factory=dict)
    cluster: ClusterInfo | None = None
    key_id: str = ""
    warnings: tuple[str, ...] = ()
    # the manifest as the run stands (the "running" one), and, when this run replaces earlier
    # results, the manifest that describes them (kept until this run publishes)
    manifest: dict[str, Any] = field(default_factory=dict)
    published_manifest: dict[str, Any] | None = None
    models: list[ModelInfo] = field(default_factory=list)  # a routed set: each with its series
    routed: Routed | None = None
    source_failed: int = 0  # series a source stage could not fetch: the run is incomplete


def public_config(cfg: RunConfig) -> dict[str, Any]:
    """The run config as recorded in the manifest: no archive or run folder path (either can
    name a patient or a department; ``pdd-batch export/report --archive`` asks for the archive)."""
    d = cfg.to_dict()
    for key in ("archive", "out_dir"):
        d.pop(key, None)
    return d


def _rekey_needed(out_dir: Path, state: RunState, key_id: str) -> bool:
    """Whether earlier rows were keyed differently (another site key, or a 1.0 run naming files
    by path): they cannot be matched with this run's keys, so everything is screened again."""
    if not state.series and not state.parts:
        return False
    manifest = read_manifest(out_dir)  # a replacing run in progress: the key of its rows
    previous = manifest.get("in_progress", {}).get("key_id") or manifest.get("key_id")
    if previous != key_id:
        log.warning(
            "earlier results in this folder were keyed with %s; screening everything again",
            f"site key {previous}" if previous else "no site key (schema 1.0)",
        )
        return True
    return False


def _bind(
    cfg: RunConfig,
    state: RunState,
    model: ModelInfo,
    key_id: str,
    progress: ProgressFn | None,
    *,
    single: bool = True,
) -> tuple[tuple[str, ...], dict[str, Any] | None]:
    """Tie the state to the model (or a model set's identity: ``single`` False, whose members'
    thresholds are part of that identity); returns the warnings for the user and, when this run
    replaces earlier results, the manifest that describes them (kept until it publishes)."""
    try:
        previous = read_manifest(cfg.out_dir)
    except ResultsError:
        previous = {}
    rekey = not cfg.force and _rekey_needed(cfg.out_dir, state, key_id)
    reason = "another site key" if rekey else None
    state.bind_model(model.checkpoint_hash, model.model_id, force=cfg.force or rekey, reason=reason)
    if single:
        state.bind_threshold(model.threshold)
    warning = state.replacement_warning()
    if warning is None:
        return (), None
    log.warning("%s", warning)
    _emit(progress, "warning", 0, None, note=warning)
    published = None
    if previous and (previous.get("status") != STATUS_RUNNING or previous.get("in_progress")):
        published = {k: v for k, v in previous.items() if k not in ("error", "in_progress")}
    return (warning,), published


def _running_manifest(run: _Run) -> dict[str, Any]:
    """The manifest written when the run starts (status ``running``)."""
    cfg, model = run.cfg, run.model
    if run.published_manifest is not None:  # the earlier results stay described until publish
        return {
            **run.published_manifest,
            "status": STATUS_RUNNING,
            "exit_code": exit_code_for(STATUS_RUNNING),
            "in_progress": {
                "run_id": cfg.run_id,
                "model_id": model.model_id,
                "checkpoint_hash": model.checkpoint_hash,
                "key_id": run.key_id,
                "series_pending": len(run.pending),
                "warnings": list(run.warnings),
            },
        }
    return build_manifest(
        run_id=cfg.run_id,
        status=STATUS_RUNNING,
        counts=InputCounts.from_outcomes({}),
        key_id=run.key_id,
        model_id=model.model_id,
        checkpoint_hash=model.checkpoint_hash,
        extra={
            "run_config": public_config(cfg),
            "series_seen": len(run.disc.series),
            "series_pending": len(run.pending),
            "warnings": list(run.warnings),
        },
    )


def _prepare(
    cfg: RunConfig,
    progress: ProgressFn | None,
    crosswalk: Path | None,
    source_errors: Sequence[FileRecord] = (),
) -> _Run:
    """State reconciled, model bound, archive discovered, work planned, sink ready."""
    t_start = time.perf_counter()
    key_id = keys.site_key().key_id
    state = RunState.load(cfg.out_dir)
    state.reconcile()
    models, model = resolve_models(cfg)
    warnings, published_manifest = _bind(
        cfg, state, model, key_id, progress, single=len(models) == 1
    )
    t = time.perf_counter()
    disc = discover(
        cfg.archive,
        open_archives=cfg.open_archives,
        limits=cfg.limits,
        follow_links_outside=cfg.follow_links_outside,
    )
    disc.files.extend(source_errors)
    discover_s = time.perf_counter() - t
    routed = _route(disc, models, state, cfg)
    disc = routed.disc
    _emit(progress, "discover", len(disc.files), len(disc.files), note=f"{len(disc.series)} series")
    if crosswalk is not None:
        write_crosswalk(crosswalk, disc, key_id)
    pending, fingerprints = _plan_work(cfg, disc, state)
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
        _emit(progress, "commit", stats.series_committed, n_pending)

    sink = SliceSink(
        state,
        prov,
        {r.series_key: r for r in pending},
        fingerprints,
        _part_names(cfg.run_id),
        rows_per_file=cfg.rows_per_file,
        flush_seconds=cfg.flush_seconds,
        on_commit=on_commit,
        models={m.model_id: replace(prov, **_model_fields(m)) for m in models}
        if len(models) > 1
        else None,
    )
    run = _Run(cfg, state, model, disc, pending, sink, progress, t_start, key_id=key_id)
    run.models, run.routed = models, routed
    run.source_failed = len(source_errors)
    run.timings["discover_s"] = discover_s
    run.warnings, run.published_manifest = warnings, published_manifest
    run.manifest = _running_manifest(run)
    write_manifest(cfg.out_dir, run.manifest)
    return run


def _error_text(exc: BaseException, run: _Run) -> str:
    """Why a run failed, safe to store: UIDs masked (``failure_reason``), no paths (the
    archive's own, and any other absolute or quoted one)."""
    if isinstance(exc, KeyboardInterrupt):
        return "interrupted (KeyboardInterrupt)"
    paths = [str(run.disc.root), *(f.path for f in run.disc.files)]
    return scrub_paths(keys.redact_paths(failure_reason(exc), paths))


def _model_fields(m: ModelInfo) -> dict[str, Any]:
    """The provenance fields that differ between the models of a set."""
    return {
        "model_id": m.model_id,
        "checkpoint_hash": m.checkpoint_hash,
        "preprocessing": m.preprocessing,
        "threshold": m.threshold,
        "ood_threshold": m.ood_threshold,
    }


def _route(disc: Discovery, models: list[ModelInfo], state: RunState, cfg: RunConfig) -> Routed:
    """Series to models by scope (``pdd_batch.ingest.scope``); rows an earlier run wrote for a
    series that is now out of every scope are removed."""
    from pdd_batch.ingest.scope import route_discovery

    routed = route_discovery(disc, [m.scope for m in models])
    stale = [k for k in routed.out_of_scope_keys if k in state.series]
    if stale:
        log.info("%d series are outside every model's scope; removing their rows", len(stale))
        state.forget(stale)
    return routed


def _dataset(run: _Run, cluster: ClusterInfo) -> ray.data.Dataset:
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
) -> ScreenResult:
    run = _prepare(cfg, progress, crosswalk, source_errors)
    t = time.perf_counter()
    try:
        if not run.pending:
            note = "nothing new: all series screened earlier"
            if run.source_failed:  # not "all": some could not be fetched
                note = f"nothing to screen: {run.source_failed} series could not be fetched"
            for stage in ("series", "slices", "commit"):
                _emit(progress, stage, 0, 0, note=note)
        else:
            with (
                ray_logs_to(cfg.out_dir / "_logs"),
                connect(cfg.resolved_address, num_cpus=cfg.num_cpus) as run.cluster,
            ):
                ds = _dataset(run, run.cluster)
                _stream(ds, run.sink, run.pending, progress)
    except BaseException as exc:  # the run failed: keep what is committed, say so, re-raise
        run.timings["pipeline_s"] = time.perf_counter() - t
        _fail(run, exc)
        raise
    run.timings["pipeline_s"] = time.perf_counter() - t
    return _finalise(run, STATUS_COMPLETE, None)


def _fail(run: _Run, exc: BaseException) -> None:
    """Finalise a failed run with its own error; an error of the finalising itself (a full
    disk, say) is logged, never raised in place of the first one."""
    error = _error_text(exc, run)
    try:
        run.sink.close()  # commit the series that are complete
    except Exception as close_exc:  # noqa: BLE001 - the first error is the one to raise
        log.warning("could not commit the last series: %s", _error_text(close_exc, run))
    try:
        _finalise(run, STATUS_FAILED, error)
    except Exception as fin_exc:  # noqa: BLE001 - recorded by _finalise, first error raised
        log.warning("finalising the failed run failed too: %s", _error_text(fin_exc, run))


def _run_summary(run: _Run, n_study: int, n_err: int) -> dict[str, Any]:
    stats, state = run.sink.stats, run.state
    seen = {r.series_key for r in run.disc.series}
    cluster = run.cluster
    return {
        "run_config": public_config(run.cfg),
        "timings": {k: round(v, 3) for k, v in run.timings.items()},
        "series_seen": len(seen),
        "series_screened_this_run": stats.series_committed,
        "series_reused": len(seen & set(state.series)) - stats.series_committed,
        "series_failed": len(run.sink.failed) + run.source_failed,
        "series_not_fetched": run.source_failed,
        "slices_written_this_run": stats.slices_written,
        "slices_total": sum(state.part_rows().values()),
        "studies": n_study,
        "error_rows": n_err,
        "slices_per_s": round(stats.slices_written / max(run.timings["pipeline_s"], 1e-9), 2),
        "actors": {
            "processes": len(stats.actor_peak_rss_mb),
            "peak_rss_mb": round(max(stats.actor_peak_rss_mb.values(), default=0.0), 1),
        },
        "cluster": None
        if cluster is None
        else {"mode": cluster.mode, "nodes": cluster.nodes, "resources": cluster.resources},
        "threshold": run.model.threshold,
        "warnings": list(run.warnings),
        **model_summaries(run.models, run.routed, run.pending),
    }


def _dropped_paths(disc: Discovery, state: RunState) -> dict[str, dict[str, str]]:
    """Committed series of this archive -> the paths of the files they dropped -> why (the
    state records them by file key)."""
    done = {}
    for ref in disc.series:
        rec = state.series.get(ref.series_key)
        if rec is not None:
            dropped = dict(rec.dropped)  # file key -> reason
            done[ref.series_key] = {
                f: dropped[k]
                for f in (*ref.files, *ref.spares)
                if (k := keys.file_key(f)) in dropped
            }
    return done


def _finalise(run: _Run, status: str, error: str | None) -> ScreenResult:
    """Publish the slices, rewrite studies and errors, account for every input, write the
    manifest. A failed run that replaces earlier results publishes nothing (they stay).

    On an error of its own the manifest still records status ``failed`` with the first error
    (``error`` when the run had already failed), then the error is raised.
    """
    try:
        if status == STATUS_FAILED and run.state.replacing:
            return _keep_published(run, error or "")
        return _publish(run, status, error)
    except Exception as exc:
        first = error or _error_text(exc, run)
        failed = {**run.manifest, "status": STATUS_FAILED, "error": first}
        failed["exit_code"] = exit_code_for(STATUS_FAILED)
        if not record_failure(run.cfg.out_dir, failed):
            log.warning("the manifest could not record the failure either: %s", first)
        raise


def _keep_published(run: _Run, error: str) -> ScreenResult:
    """A failed replacing run: the earlier results and their manifest fields stay."""
    manifest = {**(run.published_manifest or run.manifest), "status": STATUS_FAILED}
    manifest.update(exit_code=exit_code_for(STATUS_FAILED), error=error)
    manifest["in_progress"] = {**run.manifest.get("in_progress", {}), "run_id": run.cfg.run_id}
    write_manifest(run.cfg.out_dir, manifest)
    _emit(run.progress, "finalise", 1, 1, note=STATUS_FAILED)
    return ScreenResult(
        run.cfg.out_dir, STATUS_FAILED, exit_code_for(STATUS_FAILED), manifest, run.warnings
    )


def _publish(run: _Run, status: str, error: str | None) -> ScreenResult:
    """Swap this run's rows into ``slices/``, then studies, errors and the manifest."""
    cfg, state, disc, sink = run.cfg, run.state, run.disc, run.sink
    t = time.perf_counter()
    state.publish(cfg.run_id)
    n_study = write_studies(state, topk=cfg.topk, run_id=cfg.run_id)
    done = _dropped_paths(disc, state)
    files = [(f.path, f.status, f.reason) for f in disc.files]
    spares = {r.series_key: r.spares for r in disc.series if r.spares}
    series_files = {r.series_key: r.files for r in disc.series}
    outcomes = file_outcomes(files, series_files, done, sink.failed, spares=spares)
    n_err = write_errors(state, disc, sink.failed, outcomes, run_id=cfg.run_id)
    counts = InputCounts.from_outcomes(outcomes)
    if status == STATUS_COMPLETE and (counts.inputs_lost or run.source_failed):
        status = STATUS_INCOMPLETE  # rerun to finish: lost inputs, or series not fetched
    run.timings["finalise_s"] = time.perf_counter() - t
    run.timings["total_s"] = time.perf_counter() - run.t_start
    extra = _run_summary(run, n_study, n_err)
    if error:
        extra["error"] = error
    manifest = build_manifest(
        run_id=cfg.run_id,
        status=status,
        key_id=run.key_id,
        counts=counts,
        model_id=run.model.model_id,
        checkpoint_hash=run.model.checkpoint_hash,
        extra=extra,
    )
    write_manifest(cfg.out_dir, manifest)
    _emit(run.progress, "finalise", 1, 1, note=status)
    return ScreenResult(cfg.out_dir, status, exit_code_for(status), manifest, run.warnings)
