"""Evaluation and calibration of a trained checkpoint on labelled image lists.

``evaluate_checkpoint`` scores every image, computes image AUROC/AP/F1-max (pixel AUROC and
AUPRO when masks exist), the trivial floors (mean intensity; image size before preprocessing) and
writes ``metrics.json``, ``scores.csv`` and ``evaluation.png``. ``calibrate_checkpoint`` scores
normal images only and stores a threshold at a target false-positive rate in the checkpoint.
``run_evaluation``/``run_calibration`` run them as one Ray actor when a cluster address is given.
"""

from __future__ import annotations

import csv
import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn

from jobs.train import ray_address, run_remote
from pdd_batch.evaluation.calibration import calibration_record
from pdd_batch.evaluation.datasets import ImageItem, describe, image_size_of
from pdd_batch.evaluation.metrics import aupro, auroc_ci, floor_auroc, image_metrics, pixel_auroc
from pdd_batch.evaluation.plots import evaluation_figure
from pdd_batch.ingest.preprocess import PreprocessError, PreprocessSpec, load_image_file

log = logging.getLogger(__name__)

ProgressFn = Callable[[int, int], None]  # (images done, images total)


class EvaluationError(RuntimeError):
    """Evaluation or calibration cannot run (no usable images, a single class, no normals)."""


@dataclass
class ScoreResult:
    """Scores of a list of images (``items`` are the readable ones, in order)."""

    items: list[ImageItem]
    scores: np.ndarray  # (N,)
    mean_intensity: np.ndarray  # (N,) mean grey level of the original image, in [0, 1]
    pixel_count: np.ndarray  # (N,) H·W of the original image
    top_index: np.ndarray  # indices into items of the highest scores
    top_images: np.ndarray  # (K, S, S) model inputs of the top scores
    top_maps: np.ndarray  # (K, S, S) their anomaly maps
    maps: np.ndarray | None = None  # (N, S, S) all maps, only when asked (pixel metrics)
    masks: np.ndarray | None = None  # (N, S, S) bool ground truth, when every item has a mask
    errors: list[dict[str, str]] = field(default_factory=list)


def original_stats(path: Path) -> tuple[float, int]:
    """(mean grey level in [0, 1], H·W) of an image before preprocessing: the trivial floors."""
    with Image.open(path) as im:
        grey = np.asarray(im.convert("L"), dtype=np.float32) / 255.0
    h, w = image_size_of(path)
    return float(grey.mean()), h * w


def _load_batch(
    batch: Sequence[ImageItem], spec: PreprocessSpec, errors: list[dict[str, str]]
) -> tuple[list[np.ndarray], list[ImageItem], list[tuple[float, int]]]:
    arrays, kept, stats = [], [], []
    for it in batch:
        try:
            arrays.append(load_image_file(it.path, spec))
            stats.append(original_stats(it.path))
            kept.append(it)
        except (PreprocessError, OSError) as exc:
            errors.append({"file": it.rel, "stage": "load", "reason": str(exc)})
            log.warning("skipping an unreadable image (listed in the error records)")
    return arrays, kept, stats


@torch.no_grad()
def score_items(
    model: nn.Module,
    items: Sequence[ImageItem],
    spec: PreprocessSpec,
    *,
    batch_size: int = 16,
    keep_top: int = 8,
    keep_maps: bool = False,
    progress: ProgressFn | None = None,
) -> ScoreResult:
    """Score images with ``model.predict``; unreadable files become error records."""
    device = next(model.parameters()).device
    model.eval()
    errors: list[dict[str, str]] = []
    kept: list[ImageItem] = []
    scores, stats, all_maps = [], [], []
    top: list[tuple[float, int, np.ndarray, np.ndarray]] = []
    for start in range(0, len(items), batch_size):
        arrays, ok, st = _load_batch(items[start : start + batch_size], spec, errors)
        if arrays:
            x = torch.from_numpy(np.stack(arrays)).unsqueeze(1).to(device)  # (B, 1, S, S)
            res = model.predict(x)
            s = res.scores.float().cpu().numpy()
            m = res.maps.float().cpu().numpy()  # (B, S, S)
            for j, score in enumerate(s):
                top.append((float(score), len(kept) + j, arrays[j], m[j]))
            top = sorted(top, key=lambda t: -t[0])[:keep_top]
            if keep_maps:
                all_maps.append(m)
            kept += ok
            scores.append(s)
            stats += st
        if progress is not None:
            progress(min(start + batch_size, len(items)), len(items))
    if not kept:
        raise EvaluationError("no readable image to score")
    size = spec.image_size
    masks = None
    if keep_maps and all(it.mask is not None for it in kept):
        masks = np.stack([load_image_file(it.mask, spec) > 0.5 for it in kept])  # type: ignore[arg-type]
    return ScoreResult(
        items=kept,
        scores=np.concatenate(scores),
        mean_intensity=np.array([a for a, _ in stats], dtype=np.float64),
        pixel_count=np.array([b for _, b in stats], dtype=np.float64),
        top_index=np.array([t[1] for t in top], dtype=np.int64),
        top_images=np.stack([t[2] for t in top]) if top else np.zeros((0, size, size)),
        top_maps=np.stack([t[3] for t in top]) if top else np.zeros((0, size, size)),
        maps=np.concatenate(all_maps) if keep_maps else None,
        masks=masks,
        errors=errors,
    )


def metrics_of(res: ScoreResult) -> dict[str, Any]:
    """Image metrics of the model and of the two trivial floors; pixel metrics when masks exist."""
    labels = np.array([it.label for it in res.items])
    if len(set(labels.tolist())) < 2:
        raise EvaluationError("evaluation needs both normal and anomalous images")
    out: dict[str, Any] = image_metrics(labels, res.scores)
    out["auroc_ci95"] = list(auroc_ci(labels, res.scores, level=0.95))
    out["floors"] = {
        "mean_intensity_auroc": floor_auroc(labels, res.mean_intensity),
        "image_size_auroc": floor_auroc(labels, res.pixel_count),
    }
    if res.masks is not None and res.maps is not None and res.masks.any():
        out["pixel_auroc"] = pixel_auroc(res.masks, res.maps)
        out["aupro"] = aupro(res.masks, res.maps, fpr_limit=0.3)
    out["n_normal"] = int((labels == 0).sum())
    out["n_anomalous"] = int((labels == 1).sum())
    return out


def load_model(model_dir: Path | None, teacher_weights: dict[str, str] | None = None) -> Any:
    """``load_checkpoint`` of ``model_dir``, or of the embedded default when None.

    ``teacher_weights``: new locations of file-sourced teacher weights by role, if they moved."""
    from model.checkpoint import load_checkpoint

    if model_dir is None:
        from model.default import default_model_path

        model_dir = default_model_path()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    return load_checkpoint(Path(model_dir), device=device, teacher_weights=teacher_weights)


def _write_scores(path: Path, res: ScoreResult) -> None:
    with path.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["path", "label", "split", "score"])
        for it, s in zip(res.items, res.scores, strict=True):
            w.writerow([it.rel, it.label, it.split or "", f"{float(s):.6g}"])


def evaluate_checkpoint(
    items: Sequence[ImageItem],
    out_dir: Path,
    model_dir: Path | None = None,
    *,
    progress: ProgressFn | None = None,
    data_description: str = "",
    teacher_weights: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Evaluate a checkpoint (default: the embedded model) and write the report files.

    Returns:
        The metrics dict also written to ``out_dir/metrics.json``: ``auroc``, ``ap``, ``f1_max``,
        ``floors``, optional ``pixel_auroc``/``aupro``, counts, model id/hash, errors.

    Raises:
        EvaluationError: no readable images, or only one class.
    """
    t0 = time.perf_counter()
    loaded = load_model(model_dir, teacher_weights)
    spec = PreprocessSpec.from_dict(loaded.preprocessing)
    want_maps = any(it.mask is not None for it in items)
    res = score_items(loaded.model, items, spec, keep_maps=want_maps, progress=progress)
    metrics = metrics_of(res)
    calib = loaded.calibration or {}
    metrics.update(
        {
            "model_id": loaded.model_id,
            "checkpoint_hash": loaded.checkpoint_hash,
            "config": getattr(loaded.config, "name", ""),
            "image_size": spec.image_size,
            "data": data_description,
            "counts": describe(res.items),
            "errors": res.errors,
            "wall_s": round(time.perf_counter() - t0, 2),
        }
    )
    if "threshold" in calib:
        metrics["at_threshold"] = _rates_at_threshold(res, float(calib["threshold"]))
    _write_reports(Path(out_dir), metrics, res, loaded.model_id, calib.get("threshold"))
    return metrics


def _rates_at_threshold(res: ScoreResult, threshold: float) -> dict[str, float]:
    """False- and true-positive rates of ``score > threshold`` on the scored items."""
    flagged = res.scores > threshold
    labels = np.array([it.label for it in res.items])
    return {
        "threshold": threshold,
        "fpr": float(flagged[labels == 0].mean()),
        "tpr": float(flagged[labels == 1].mean()),
    }


def _write_reports(
    out_dir: Path, metrics: dict[str, Any], res: ScoreResult, model_id: str, threshold: Any
) -> None:
    """``metrics.json``, ``scores.csv`` and ``evaluation.png`` in ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2, sort_keys=True))
    _write_scores(out_dir / "scores.csv", res)
    title = (
        f"{metrics['config']} {model_id}: AUROC {metrics['auroc']:.3f}  "
        f"AP {metrics['ap']:.3f}  F1-max {metrics['f1_max']:.3f}"
    )
    evaluation_figure(
        out_dir / "evaluation.png",
        [it.label for it in res.items],
        res.scores,
        images=res.top_images,
        maps=res.top_maps,
        image_index=res.top_index,
        names=[f"scores.csv row {i + 1}" for i in res.top_index],  # no file names: may hold IDs
        title=title,
        threshold=threshold,
    )


def calibrate_checkpoint(
    items: Sequence[ImageItem],
    model_dir: Path,
    fpr: float = 0.05,
    *,
    split: str = "val",
    data_description: str = "",
    progress: ProgressFn | None = None,
    teacher_weights: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Score the normal images of ``items`` and store a threshold at ``fpr`` in the checkpoint.

    Raises:
        EvaluationError: no normal image among ``items``.
    """
    from model.checkpoint import set_calibration

    normals = [it for it in items if it.label == 0]
    if not normals:
        raise EvaluationError("calibration needs normal images (label 0); none were given")
    loaded = load_model(model_dir, teacher_weights)
    spec = PreprocessSpec.from_dict(loaded.preprocessing)
    res = score_items(loaded.model, normals, spec, progress=progress)
    record = calibration_record(res.scores, fpr, split=split, data=data_description)
    record["n_failed"] = len(res.errors)
    set_calibration(Path(model_dir), record)
    return record


def run_evaluation(
    items: Sequence[ImageItem],
    out_dir: Path,
    model_dir: Path | None = None,
    *,
    progress: ProgressFn | None = None,
    address: str | None = None,
    data_description: str = "",
    teacher_weights: dict[str, str] | None = None,
) -> dict[str, Any]:
    """``evaluate_checkpoint`` in-process, or as one Ray actor at ``address``/``RAY_ADDRESS``."""
    addr = ray_address(address)
    kwargs = {"data_description": data_description, "teacher_weights": teacher_weights}
    if addr is None:
        return evaluate_checkpoint(items, out_dir, model_dir, progress=progress, **kwargs)
    report = None if progress is None else (lambda p: progress(*p))
    return run_remote(
        _evaluate_tuple_progress, (list(items), Path(out_dir), model_dir), kwargs,
        address=addr, progress=report,
    )  # fmt: skip


def run_calibration(
    items: Sequence[ImageItem],
    model_dir: Path,
    fpr: float,
    *,
    split: str,
    progress: ProgressFn | None = None,
    address: str | None = None,
    data_description: str = "",
    teacher_weights: dict[str, str] | None = None,
) -> dict[str, Any]:
    """``calibrate_checkpoint`` in-process, or as one Ray actor at ``address``/``RAY_ADDRESS``."""
    addr = ray_address(address)
    kwargs = {"split": split, "data_description": data_description,
              "teacher_weights": teacher_weights}  # fmt: skip
    if addr is None:
        return calibrate_checkpoint(items, model_dir, fpr, progress=progress, **kwargs)
    report = None if progress is None else (lambda p: progress(*p))
    return run_remote(
        _calibrate_tuple_progress, (list(items), Path(model_dir), fpr), kwargs,
        address=addr, progress=report,
    )  # fmt: skip


def _evaluate_tuple_progress(*args: Any, progress: Callable[[Any], None], **kw: Any) -> Any:
    return evaluate_checkpoint(*args, progress=lambda d, n: progress((d, n)), **kw)


def _calibrate_tuple_progress(*args: Any, progress: Callable[[Any], None], **kw: Any) -> Any:
    return calibrate_checkpoint(*args, progress=lambda d, n: progress((d, n)), **kw)


@torch.no_grad()
def score_arrays(model: nn.Module, images: np.ndarray, batch_size: int = 16) -> np.ndarray:
    """Scores (N,) of model-ready images (N, S, S) in [0, 1]."""
    device = next(model.parameters()).device
    out = []
    for start in range(0, len(images), batch_size):
        x = torch.from_numpy(np.ascontiguousarray(images[start : start + batch_size]))
        res = model.predict(x.unsqueeze(1).to(device))  # (B, 1, S, S) -> scores (B,)
        out.append(res.scores.float().cpu().numpy())
    return np.concatenate(out) if out else np.zeros(0, np.float32)


def synthetic_figure_of(model: nn.Module, normals: np.ndarray, seed: int = 0) -> dict[str, Any]:
    """The validation figure of ``model`` on normal images (N, S, S): AUROC of the normals
    against their seeded synthetic-lesion copies (``pdd_batch.evaluation.synthetic``), with its
    bootstrap interval and the AUROC per lesion family.

    Raises:
        EvaluationError: fewer than 2 normal images.
    """
    from pdd_batch.evaluation.synthetic import FAMILIES, lesioned_copies, synthetic_figure

    if len(normals) < 2:
        raise EvaluationError(
            f"the synthetic-lesion figure needs at least 2 normals, got {len(normals)}"
        )
    copies = lesioned_copies(normals, seed=seed)
    normal, lesion = score_arrays(model, normals), score_arrays(model, copies.images)
    figure = synthetic_figure(normal, lesion, copies.source, copies.family, seed=seed)
    figure.update(seed=seed, families=list(FAMILIES))
    figure["scores"] = {  # for paired comparisons of models on the same copies; not recorded
        "normal": normal.tolist(),
        "lesion": lesion.tolist(),
        "source": copies.source.tolist(),
        "family": copies.family.tolist(),
    }
    return figure


def _normal_images(
    data: Sequence[ImageItem] | Path, spec: PreprocessSpec
) -> tuple[np.ndarray, list[dict[str, str]]]:
    """Model inputs (N, S, S) of the normal images of a list, or of every slice of an archive of
    normal studies (read as ``screen`` reads them); unreadable ones become error records."""
    from jobs.train import TrainConfig, archive_images, load_images

    if isinstance(data, (str, Path)):
        images, _, errors = archive_images(Path(data), spec, TrainConfig())
    else:
        images, _, errors = load_images([it for it in data if it.label == 0], spec)
    return images, errors


def evaluate_synthetic(
    data: Sequence[ImageItem] | Path,
    out_dir: Path,
    model_dir: Path | None = None,
    *,
    seed: int = 0,
    data_description: str = "",
    teacher_weights: dict[str, str] | None = None,
    progress: ProgressFn | None = None,
) -> dict[str, Any]:
    """The synthetic-lesion figure of a checkpoint on normals only (no labelled anomaly needed):
    written to ``out_dir/synthetic.json`` and returned.

    Raises:
        EvaluationError: fewer than 2 readable normal images.
    """
    t0 = time.perf_counter()
    loaded = load_model(model_dir, teacher_weights)
    spec = PreprocessSpec.from_dict(loaded.preprocessing)
    images, errors = _normal_images(data, spec)
    if progress is not None:
        progress(len(images), len(images))
    figure = synthetic_figure_of(loaded.model, images, seed)
    figure.pop("scores", None)
    figure.update(
        model_id=loaded.model_id,
        checkpoint_hash=loaded.checkpoint_hash,
        config=getattr(loaded.config, "name", ""),
        data=data_description,
        errors=[{k: v for k, v in e.items() if k != "file"} for e in errors],  # no paths: names
        wall_s=round(time.perf_counter() - t0, 2),
    )
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "synthetic.json").write_text(json.dumps(figure, indent=2, sort_keys=True))
    return figure


def run_synthetic_evaluation(
    data: Sequence[ImageItem] | Path,
    out_dir: Path,
    model_dir: Path | None = None,
    *,
    address: str | None = None,
    **kwargs: Any,
) -> dict[str, Any]:
    """``evaluate_synthetic`` in-process, or as one Ray actor at ``address``/``RAY_ADDRESS``."""
    addr = ray_address(address)
    if addr is None:
        return evaluate_synthetic(data, out_dir, model_dir, **kwargs)
    kwargs.pop("progress", None)
    return run_remote(
        _synthetic_tuple_progress,
        (data if isinstance(data, Path) else list(data), Path(out_dir), model_dir),
        kwargs,
        address=addr,
    )


def _synthetic_tuple_progress(*args: Any, progress: Callable[[Any], None], **kw: Any) -> Any:
    return evaluate_synthetic(*args, progress=lambda d, n: progress((d, n)), **kw)
