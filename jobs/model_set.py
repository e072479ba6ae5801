"""A model set: several checkpoints, each screening the series its scope matches.

``screen ARCHIVE --model A --model B`` (or ``--model SET`` where SET is a folder of checkpoint
folders) routes each series with ``pdd_batch.ingest.scope.route_discovery``; the Ray graph is one
dataset, the union of one branch per model (read tasks with that model's preprocessing -> that
model's actor pool -> PNG encoding), so every model keeps its own pool and the sink sees one
stream. A run folder is bound to the set's identity (``set_identity``), which covers every
member's checkpoint hash and threshold: a changed member rescreens the folder.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import ray

from jobs.graph import build_dataset
from jobs.resources import ActorPlan, plan_model_pools
from pdd_batch.evaluation.site_calibration import threshold_source
from pdd_batch.ingest.archive_io import IngestLimits
from pdd_batch.ingest.discovery import SeriesRef
from pdd_batch.ingest.scope import ModelScope
from pdd_batch.runs.config import RunConfig
from pdd_batch.runs.lifecycle import model_summaries  # noqa: F401 - re-exported
from pdd_batch.runs.run_types import ModelInfo, RunContext

log = logging.getLogger(__name__)

CONFIG_FILE = "config.json"


class ModelSetError(ValueError):
    """Checkpoints that cannot form a set (none found, the same model twice)."""


def checkpoint_folders(paths: Sequence[Path | None]) -> list[Path | None]:
    """The checkpoint folders named by ``--model`` options, in order; a folder without
    ``config.json`` is a model set whose checkpoint sub-folders are taken in name order.
    ``None`` (no ``--model``) stands for the embedded default set (head CT, chest X-ray:
    ``model.default.default_model_paths``)."""
    from model.default import default_model_paths

    out: list[Path | None] = []
    for path in paths or [None]:
        if path is None:
            out.extend(default_model_paths())
            continue
        if (Path(path) / CONFIG_FILE).is_file() or not Path(path).is_dir():
            out.append(path)
            continue
        members = sorted(p for p in Path(path).iterdir() if (p / CONFIG_FILE).is_file())
        if not members:
            raise ModelSetError(f"{Path(path).name}: neither a checkpoint nor a model set folder")
        out.extend(members)
    return out


def check_distinct(models: Sequence[ModelInfo]) -> None:
    """Each model of a set once (rows are traced to their model by ``model_id``)."""
    ids = [m.model_id for m in models]
    repeated = sorted({i for i in ids if ids.count(i) > 1})
    if repeated:
        raise ModelSetError(f"model(s) given more than once: {repeated}")


def set_identity(models: Sequence[ModelInfo]) -> tuple[str, str]:
    """(checkpoint hash, model id) a run folder is bound to: for one model its own (with its
    in-distribution check's file folded in when it has one: a refitted check rescreens); for a
    set a digest of every member's hash, threshold and check, and ``set-<digest[:12]>``."""
    if len(models) == 1 and models[0].ood_sha256 is None:
        return models[0].checkpoint_hash, models[0].model_id
    h = hashlib.sha256()
    for m in models:
        h.update(f"{m.checkpoint_hash}\0{m.ood_sha256}\0".encode())
        if len(models) > 1:  # one model: recalibration re-flags in place (bind_threshold)
            h.update(f"{m.threshold}\n".encode())
    digest = h.hexdigest()
    return digest, models[0].model_id if len(models) == 1 else f"set-{digest[:12]}"


def build_routed_dataset(
    by_model: Sequence[Sequence[SeriesRef]],
    root: Path,
    models: Sequence[ModelInfo],
    plans: Sequence[ActorPlan],
    precision: str = "fp32",
    teacher_weights: dict[str, str] | None = None,
    limits: IngestLimits | None = None,
) -> ray.data.Dataset:
    """One dataset: the union of ``jobs.screen.build_dataset`` for each model with series."""
    branches = [
        build_dataset(list(units), root, model, plan, precision, teacher_weights, limits)
        for units, model, plan in zip(by_model, models, plans, strict=True)
        if units
    ]
    if not branches:
        raise ModelSetError("no series to screen")
    log.info("model set: %d branch(es) of %d models", len(branches), len(models))
    return branches[0].union(*branches[1:]) if len(branches) > 1 else branches[0]


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


def resolve_models(cfg: RunConfig) -> tuple[list[ModelInfo], ModelInfo]:
    """Resolve the run's checkpoints.

    Returns:
        (the models in routing order, the identity the folder is bound to: the model itself,
        or for a set a ``ModelInfo`` with the set's hash and id and no threshold; a set's identity
        covers every member's threshold, so ``bind_threshold`` is for a single model only).
    """
    paths = checkpoint_folders([cfg.model_path, *cfg.more_models])
    models = [resolve_model(p, cfg.teacher_weights) for p in paths]
    check_distinct(models)
    checkpoint_hash, model_id = set_identity(models)
    identity = models[0]
    if len(models) > 1:
        identity = replace(identity, checkpoint_hash=checkpoint_hash, model_id=model_id)
        identity = replace(identity, threshold=None, ood_threshold=None)
    for m in models:
        if not m.scope.known:
            log.warning("model %s records no scope: it scores every series", m.model_id)
    return models, identity


def routed_dataset(run: RunContext, resources: dict[str, float]) -> ray.data.Dataset:
    """The dataset of a model set's pending series: one branch and actor pool per model that
    has series (``plan_model_pools`` shares the cluster between those pools)."""
    assert run.routed is not None
    pending = {r.series_key for r in run.pending}
    by_model = [[r for r in refs if r.series_key in pending] for refs in run.routed.by_model]
    active = [i for i, refs in enumerate(by_model) if refs]
    plans = plan_model_pools(
        resources, len(active), num_actors=run.cfg.num_actors, batch_size=run.cfg.batch_size
    )
    return build_routed_dataset(
        [by_model[i] for i in active],
        run.disc.root,
        [run.models[i] for i in active],
        plans,
        precision=run.cfg.precision,
        teacher_weights=run.cfg.teacher_weights,
        limits=run.cfg.limits,
    )
