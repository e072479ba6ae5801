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
import logging
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import ray

from jobs.resources import ActorPlan, plan_model_pools
from pdd_batch.ingest.archive_io import IngestLimits
from pdd_batch.ingest.discovery import SeriesRef
from pdd_batch.ingest.scope import Routed
from pdd_batch.runs.config import RunConfig

if TYPE_CHECKING:  # jobs.screen imports this module
    from jobs.screen import ModelInfo, _Run

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
    from jobs.screen import build_dataset

    branches = [
        build_dataset(list(units), root, model, plan, precision, teacher_weights, limits)
        for units, model, plan in zip(by_model, models, plans, strict=True)
        if units
    ]
    if not branches:
        raise ModelSetError("no series to screen")
    log.info("model set: %d branch(es) of %d models", len(branches), len(models))
    return branches[0].union(*branches[1:]) if len(branches) > 1 else branches[0]


def resolve_models(cfg: RunConfig) -> tuple[list[ModelInfo], ModelInfo]:
    """Resolve the run's checkpoints.

    Returns:
        (the models in routing order, the identity the folder is bound to: the model itself,
        or for a set a ``ModelInfo`` with the set's hash and id and no threshold; a set's identity
        covers every member's threshold, so ``bind_threshold`` is for a single model only).
    """
    from jobs.screen import resolve_model

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


def routed_dataset(run: _Run, resources: dict[str, float]) -> ray.data.Dataset:
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
