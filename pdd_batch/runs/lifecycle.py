"""The lifecycle of a screening run, without Ray: binding the run folder to the model, planning
the work, the running manifest, and the end of a run (publishing the rows, the study rollup, the
errors table, the manifest and the summary data). ``jobs.screen`` calls these around its Ray
graph; the types are in ``pdd_batch.runs.run_types``."""

from __future__ import annotations

import hashlib
import logging
import re
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from pdd_batch.ingest import keys
from pdd_batch.ingest.archive_io import split_member
from pdd_batch.ingest.reasons import scrub_reason
from pdd_batch.ingest.scope import Routed, route_discovery
from pdd_batch.ingest.series import Discovery, SeriesRef
from pdd_batch.runs.config import RunConfig
from pdd_batch.runs.manifest import (
    STATUS_COMPLETE,
    STATUS_FAILED,
    STATUS_INCOMPLETE,
    STATUS_RUNNING,
    InputCounts,
    build_manifest,
    exit_code_for,
    file_outcomes,
    record_failure,
    scrub_paths,
    write_manifest,
)
from pdd_batch.runs.results import ResultsError, read_manifest
from pdd_batch.runs.run_types import ModelInfo, ProgressEvent, ProgressFn, RunContext, ScreenResult
from pdd_batch.runs.state import RunState
from pdd_batch.runs.tables import write_errors, write_studies

log = logging.getLogger(__name__)

_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_ERROR_LINE = re.compile(r"^\s*(?:[\w.]+\.)?(\w+(?:Error|Exception)): (.+)$", re.MULTILINE)


def failure_reason(exc: BaseException) -> str:
    """Why a run failed, safe to store and show (``scrub_reason``): ``Name: message`` of the
    innermost error quoted in ``exc``'s text, else of ``exc`` itself.

    Ray reports an actor that died in its constructor as ``ActorDiedError`` whose text quotes the
    actor's own traceback; its last ``SomeError: message`` line is what the user must read.
    """
    text = _ANSI.sub("", str(exc))
    quoted = _ERROR_LINE.findall(text)
    if quoted:
        name, message = quoted[-1]
        return scrub_reason(f"{name}: {message}", keep_paths=True)
    return scrub_reason(f"{type(exc).__name__}: {text}", keep_paths=True)


def model_summaries(
    models: Sequence[ModelInfo], routed: Routed | None, pending: Sequence[SeriesRef]
) -> dict[str, Any]:
    """Manifest entries: each model with its scope and the series routed to it, and the inputs
    outside every model's scope (counted in ``inputs_skipped``, never scored)."""
    by_model = routed.by_model if routed is not None else tuple(() for _ in models)
    return {
        "inputs_out_of_scope": routed.out_of_scope_files if routed is not None else 0,
        "series_out_of_scope": routed.out_of_scope_series if routed is not None else 0,
        "models": [
            {
                "model_id": m.model_id,
                "checkpoint_hash": m.checkpoint_hash,
                "threshold": m.threshold,
                "threshold_source": m.threshold_source,
                "ood_threshold": m.ood_threshold,
                "scope": m.scope.to_dict() if m.scope.known else "unknown",
                "series_routed": len(refs),
            }
            for m, refs in zip(models, by_model, strict=True)
        ],
    }


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


def part_names(run_id: str) -> Iterator[str]:
    i = 0
    while True:
        i += 1
        yield f"part-{run_id}-{i:05d}.parquet"


def emit(progress: ProgressFn | None, *args: Any, **kwargs: Any) -> None:
    if progress is not None:
        progress(ProgressEvent(*args, **kwargs))


def plan_work(cfg: RunConfig, disc: Discovery, state: RunState) -> tuple[list[SeriesRef], dict]:
    fingerprints = {r.series_key: series_fingerprint(disc.root, r) for r in disc.series}
    fp = fingerprints
    pending = [r for r in disc.series if not state.is_done(r.series_key, fp[r.series_key])]
    changed = [r.series_key for r in pending if r.series_key in state.series]
    if changed:
        log.info("%d series changed since they were screened; replacing their rows", len(changed))
        state.forget(changed)
    return pending, fingerprints


def public_config(cfg: RunConfig) -> dict[str, Any]:
    """The run config as recorded in the manifest: no archive or run folder path (either can
    name a patient or a department; ``pdd-batch export/report --archive`` asks for the archive)."""
    d = cfg.to_dict()
    for key in ("archive", "out_dir"):
        d.pop(key, None)
    return d


def rekey_needed(out_dir: Path, state: RunState, key_id: str) -> bool:
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


def bind(
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
    rekey = not cfg.force and rekey_needed(cfg.out_dir, state, key_id)
    reason = "another site key" if rekey else None
    state.bind_model(model.checkpoint_hash, model.model_id, force=cfg.force or rekey, reason=reason)
    if single:
        state.bind_threshold(model.threshold)
    warning = state.replacement_warning()
    if warning is None:
        return (), None
    log.warning("%s", warning)
    emit(progress, "warning", 0, None, note=warning)
    published = None
    if previous and (previous.get("status") != STATUS_RUNNING or previous.get("in_progress")):
        published = {k: v for k, v in previous.items() if k not in ("error", "in_progress")}
    return (warning,), published


def running_manifest(run: RunContext) -> dict[str, Any]:
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


def error_text(exc: BaseException, run: RunContext) -> str:
    """Why a run failed, safe to store: UIDs masked (``failure_reason``), no paths (the
    archive's own, and any other absolute or quoted one)."""
    if isinstance(exc, KeyboardInterrupt):
        return "interrupted (KeyboardInterrupt)"
    paths = [str(run.disc.root), *(f.path for f in run.disc.files)]
    return scrub_paths(keys.redact_paths(failure_reason(exc), paths))


def model_fields(m: ModelInfo) -> dict[str, Any]:
    """The provenance fields that differ between the models of a set."""
    return {
        "model_id": m.model_id,
        "checkpoint_hash": m.checkpoint_hash,
        "preprocessing": m.preprocessing,
        "threshold": m.threshold,
        "ood_threshold": m.ood_threshold,
    }


def route(disc: Discovery, models: list[ModelInfo], state: RunState, cfg: RunConfig) -> Routed:
    """Series to models by scope (``pdd_batch.ingest.scope``); rows an earlier run wrote for a
    series that is now out of every scope are removed."""

    routed = route_discovery(disc, [m.scope for m in models])
    stale = [k for k in routed.out_of_scope_keys if k in state.series]
    if stale:
        log.info("%d series are outside every model's scope; removing their rows", len(stale))
        state.forget(stale)
    return routed


def fail(run: RunContext, exc: BaseException) -> None:
    """Finalise a failed run with its own error; an error of the finalising itself (a full
    disk, say) is logged, never raised in place of the first one."""
    error = error_text(exc, run)
    try:
        run.sink.close()  # commit the series that are complete
    except Exception as close_exc:  # noqa: BLE001 - the first error is the one to raise
        log.warning("could not commit the last series: %s", error_text(close_exc, run))
    try:
        finalise(run, STATUS_FAILED, error)
    except Exception as fin_exc:  # noqa: BLE001 - recorded by finalise, first error raised
        log.warning("finalising the failed run failed too: %s", error_text(fin_exc, run))


def run_summary(run: RunContext, n_study: int, n_err: int) -> dict[str, Any]:
    stats, state = run.sink.stats, run.state
    seen = {r.series_key for r in run.disc.series}
    cluster = run.cluster
    return {
        "run_config": public_config(run.cfg),
        "timings": {k: round(v, 3) for k, v in run.timings.items()},
        "series_seen": len(seen),
        "discovery": run.discovery,
        "series_screened_this_run": stats.series_committed,
        "series_reused": sum(1 for k in seen if k in state.series) - stats.series_committed,
        "series_failed": len(run.sink.failed) + run.source_failed,
        "series_not_fetched": run.source_failed,
        **({"pacs": run.source_summary} if run.source_summary else {}),
        "slices_written_this_run": stats.slices_written,
        "slices_total": state.committed_rows(),
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


def dropped_paths(disc: Discovery, state: RunState) -> dict[str, dict[str, str]]:
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


def finalise(run: RunContext, status: str, error: str | None) -> ScreenResult:
    """Publish the slices, rewrite studies and errors, account for every input, write the
    manifest. A failed run that replaces earlier results publishes nothing (they stay).

    On an error of its own the manifest still records status ``failed`` with the first error
    (``error`` when the run had already failed), then the error is raised.
    """
    try:
        if status == STATUS_FAILED and run.state.replacing:
            return keep_published(run, error or "")
        return publish_run(run, status, error)
    except Exception as exc:
        first = error or error_text(exc, run)
        failed = {**run.manifest, "status": STATUS_FAILED, "error": first}
        failed["exit_code"] = exit_code_for(STATUS_FAILED)
        if not record_failure(run.cfg.out_dir, failed):
            log.warning("the manifest could not record the failure either: %s", first)
        raise


def keep_published(run: RunContext, error: str) -> ScreenResult:
    """A failed replacing run: the earlier results and their manifest fields stay."""
    manifest = {**(run.published_manifest or run.manifest), "status": STATUS_FAILED}
    manifest.update(exit_code=exit_code_for(STATUS_FAILED), error=error)
    manifest["in_progress"] = {**run.manifest.get("in_progress", {}), "run_id": run.cfg.run_id}
    write_manifest(run.cfg.out_dir, manifest)
    emit(run.progress, "finalise", 1, 1, note=STATUS_FAILED)
    return ScreenResult(
        run.cfg.out_dir, STATUS_FAILED, exit_code_for(STATUS_FAILED), manifest, run.warnings
    )


def publish_run(run: RunContext, status: str, error: str | None) -> ScreenResult:
    """Swap this run's rows into ``slices/``, then studies, errors and the manifest."""
    cfg, state, disc, sink = run.cfg, run.state, run.disc, run.sink
    t = time.perf_counter()
    state.publish(cfg.run_id)
    n_study = write_studies(state, topk=cfg.topk, run_id=cfg.run_id, min_assessed=cfg.min_assessed)
    done = dropped_paths(disc, state)
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
    extra = run_summary(run, n_study, n_err)
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
    emit(run.progress, "finalise", 1, 1, note=status)
    return ScreenResult(cfg.out_dir, status, exit_code_for(status), manifest, run.warnings)
