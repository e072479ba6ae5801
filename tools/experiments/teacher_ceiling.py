"""How far a teacher's features alone separate HeadCT: a nearest-neighbour patch score, no training.

A diagnostic behind docs/results.md ("The teacher's ceiling"), not a product path. Each test image
is scored like PatchCore without coreset sampling: the teacher's levels (3×3 local average,
resized to the finest chosen level, concatenated) give one feature per patch; a patch's distance
is the Euclidean distance to its nearest patch in the training normals; the image score is its
largest patch distance. If this scores about as high as the trained PDD/RD4AD heads, the teacher's
features, not the distillation, set the limit.

Run as a command (not a test)::

    python -m tools.experiments.teacher_ceiling --data ../shared/data/headct --levels 0 1 2 \
        --resplits 0 1 2 3 4 5 6 7 8 9

Distances are computed once per (query image, normal image) pair, so the fixed split and every
random re-draw are scored from the same table.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from jobs.train import build, load_images
from model.train_step import feature_bank
from pdd_batch.evaluation.datasets import ImageItem
from pdd_batch.evaluation.metrics import image_metrics
from pdd_batch.ingest.preprocess import PreprocessSpec
from tools.experiments.recipes import headct_items, headct_resplit_items, variant_config


def patch_features(cnn_levels: Sequence[Tensor], levels: Sequence[int]) -> Tensor:
    """One feature per patch from the chosen teacher levels.

    Args:
        cnn_levels: the teacher's maps, (N, C_l, H_l, W_l) per level.
        levels: indices into ``cnn_levels``; the first sets the patch grid (H, W).

    Returns:
        (N, H * W, ΣC_l) float32: each level 3×3-averaged, resized to (H, W), concatenated.
    """
    grid = cnn_levels[levels[0]].shape[-2:]
    parts = [
        F.interpolate(F.avg_pool2d(cnn_levels[lv].float(), 3, 1, 1), size=grid, mode="bilinear",
                      align_corners=False)  # (N, C_l, H, W)
        for lv in levels
    ]  # fmt: skip
    feats = torch.cat(parts, dim=1)  # (N, C, H, W)
    n, c = feats.shape[:2]
    return feats.permute(0, 2, 3, 1).reshape(n, -1, c)  # (N, H*W, C)


def nearest_patch_distances(queries: Tensor, bank: Tensor, max_elements: int = 1 << 26) -> Tensor:
    """For every query patch, the distance to the nearest patch of each bank image.

    Args:
        queries: (Q, P, C) patch features of the images to score.
        bank: (N, P', C) patch features of the normal images.
        max_elements: largest distance block computed at once (memory bound, 256 MiB in float32).

    Returns:
        (Q, P, N): ``out[q, p, n] = min_p' ||queries[q, p] − bank[n, p']||``.
    """
    n, pb, c = bank.shape
    per_chunk = max(1, max_elements // (queries.shape[1] * pb))  # bank images per cdist call
    rows = []
    for q in queries:  # q: (P, C)
        parts = []
        for start in range(0, n, per_chunk):
            chunk = bank[start : start + per_chunk]  # (n_c, P', C)
            d = torch.cdist(q.unsqueeze(0), chunk.reshape(1, -1, c))[0]  # (P, n_c*P')
            parts.append(d.view(q.shape[0], chunk.shape[0], pb).amin(dim=2))  # (P, n_c)
        rows.append(torch.cat(parts, dim=1))  # (P, N)
    return torch.stack(rows)  # (Q, P, N)


def knn_scores(distances: Tensor, train: Sequence[int]) -> np.ndarray:
    """Image scores against the normals ``train`` (indices into the bank's images).

    Args:
        distances: (Q, P, N) from ``nearest_patch_distances``.
        train: bank images that form the memory.

    Returns:
        (Q,) the largest patch distance to the memory.
    """
    idx = torch.as_tensor(list(train), dtype=torch.long)
    return distances[:, :, idx].amin(dim=2).amax(dim=1).numpy()  # (Q,)


def _split_metrics(
    items: list[ImageItem], test: list[ImageItem], row_of: dict[tuple[int, str], int],
    bank_of: dict[str, int], dist: Tensor,
) -> dict[str, float]:  # fmt: skip
    """AUROC/AP/F1-max of one split, scored from the shared distance table.

    ``row_of``: (label, path) → row of ``dist``; ``bank_of``: a normal's path → its bank column.
    """
    train = [bank_of[str(it.path)] for it in items if it.split == "train" and it.label == 0]
    scores = knn_scores(dist, train)
    picked = np.array([scores[row_of[(it.label, str(it.path))]] for it in test])
    labels = np.array([it.label for it in test])
    return image_metrics(labels, picked)


def ceiling(
    data: Path, levels: Sequence[int], image_size: int, variants: Sequence[str],
    resplits: Sequence[int], emit: Callable[[str], None] = print,
) -> list[dict[str, object]]:  # fmt: skip
    """The nearest-neighbour AUROC of the CNN teachers of ``variants`` (their patch features
    concatenated) on the fixed split and the re-draws."""
    items, test, _ = headct_items(data)
    everyone = sorted({(it.label, str(it.path)): it for it in items}.values(),
                      key=lambda it: (it.label, str(it.path)))  # fmt: skip
    images, kept, errors = load_images(everyone, PreprocessSpec(image_size=image_size))
    if errors:
        raise RuntimeError(f"unreadable images: {errors[:3]}")
    per_teacher = []
    for variant in variants:
        model = build(variant_config(variant, image_size)).eval()
        cnn, _ = feature_bank(model, torch.from_numpy(images).unsqueeze(1))  # (N, C_l, h, w)
        per_teacher.append(patch_features(cnn, levels))  # (N, P, C_t)
    feats = torch.cat(per_teacher, dim=2)  # (N, P, ΣC_t)
    row_of = {(it.label, str(it.path)): i for i, it in enumerate(kept)}
    normal_rows = [i for i, it in enumerate(kept) if it.label == 0]
    bank_of = {str(kept[i].path): col for col, i in enumerate(normal_rows)}
    dist = nearest_patch_distances(feats, feats[normal_rows])  # (N, P, N_normal)
    rows: list[dict[str, object]] = []
    splits = [("split.csv", items, test)]
    splits += [(f"re-draw {d}", *headct_resplit_items(data, d)[:2]) for d in resplits]
    for name, split_items, split_test in splits:
        m = _split_metrics(split_items, split_test, row_of, bank_of, dist)
        row = {"split": name, "variants": list(variants), "levels": list(levels),
               "image_size": image_size, **m}  # fmt: skip
        emit(json.dumps(row))
        rows.append(row)
    return rows


def main(argv: list[str] | None = None, emit: Callable[[str], None] = print) -> int:
    """Command-line entry point (``python -m tools.experiments.teacher_ceiling``)."""
    p = argparse.ArgumentParser(
        prog="python -m tools.experiments.teacher_ceiling", description=__doc__
    )
    p.add_argument("--data", type=Path, required=True, help="HeadCT folder with split.csv")
    p.add_argument("--levels", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--image-size", type=int, default=128)
    p.add_argument(
        "--variants", nargs="+", default=["pdd-lite0"],
        help="whose CNN teachers (recipes variants; several: features concatenated)",
    )  # fmt: skip
    p.add_argument("--resplits", type=int, nargs="*", default=[])
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = ceiling(args.data, args.levels, args.image_size, args.variants, args.resplits, emit)
    draws = [float(r["auroc"]) for r in rows[1:]]  # type: ignore[arg-type]
    if draws:
        sd = float(np.std(draws, ddof=1)) if len(draws) > 1 else 0.0
        emit(f"fixed split AUROC {rows[0]['auroc']:.3f}; {len(draws)} re-draws "
             f"{np.mean(draws):.3f} ± {sd:.3f}")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
