"""The teacher-ceiling diagnostic: nearest-patch distances, image scores, the command end to end."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from tools.experiments.teacher_ceiling import (
    knn_scores,
    main,
    nearest_patch_distances,
    patch_features,
)


def test_nearest_patch_distances_match_brute_force_in_any_chunking() -> None:
    gen = torch.Generator().manual_seed(0)
    queries = torch.randn(3, 5, 4, generator=gen)  # (Q, P, C)
    bank = torch.randn(6, 7, 4, generator=gen)  # (N, P', C)
    q, b = queries.numpy()[:, :, None, None, :], bank.numpy()[None, None]  # broadcast (Q,P,N,P',C)
    expected = np.sqrt(((q - b) ** 2).sum(-1)).min(-1)  # (Q, P, N)
    for max_elements in (1, 35, 1 << 26):  # one bank image per call … all at once
        got = nearest_patch_distances(queries, bank, max_elements=max_elements)
        assert got.shape == (3, 5, 6)
        np.testing.assert_allclose(got.numpy(), expected, rtol=1e-5, atol=1e-5)


def test_knn_score_is_the_largest_patch_distance_to_the_chosen_memory() -> None:
    bank = torch.zeros(2, 4, 3)  # (N, P', C)
    bank[1] += 10.0
    query = bank[:1].clone()  # a copy of bank image 0 …
    query[0, 2, 0] = 3.0  # … with one patch moved by 3
    dist = nearest_patch_distances(query, bank)  # (1, 4, 2)
    assert knn_scores(dist, [0]) == np.float32(3.0)
    assert knn_scores(dist, [0, 1]) == np.float32(3.0)  # image 1 is farther for every patch
    assert np.isclose(knn_scores(dist, [1])[0], np.sqrt(3 * 10**2))  # an unmoved 0-patch vs 10s


def test_patch_features_resize_every_level_to_the_first_grid() -> None:
    levels = [torch.ones(2, 3, 8, 8), torch.ones(2, 5, 4, 4), torch.ones(2, 7, 2, 2)]
    feats = patch_features(levels, [1, 2])
    assert feats.shape == (2, 16, 12)  # (N, 4*4, 5+7)
    assert patch_features(levels, [0, 1, 2]).shape == (2, 64, 15)


def _head(size: int, seed: int, lesion: bool) -> np.ndarray:
    """A grey disk with mild texture; ``lesion`` adds a bright blob inside it."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    r = np.hypot(yy - size / 2, xx - size / 2)
    img = np.where(r < size * 0.4, 110 + rng.normal(0, 4, (size, size)), 0)
    if lesion:
        img[(np.hypot(yy - size * 0.4, xx - size * 0.55) < size * 0.1)] = 250
    return np.clip(img, 0, 255).astype(np.uint8)


def test_command_separates_blobs_from_normals_on_the_split_and_re_draws(tmp_path: Path) -> None:
    """Real EfficientNet-Lite0 features: bright blobs must outscore every normal (AUROC 1)."""
    data = tmp_path / "headct"
    rows = ["path,label,split"]
    for kind, n, label in (("normal", 74, 0), ("hemorrhage", 4, 1)):
        (data / kind).mkdir(parents=True)
        for i in range(n):
            Image.fromarray(_head(64, i + 100 * label, bool(label))).save(data / kind / f"{i}.png")
            split = "test" if label or i >= 70 else ("val" if i < 2 else "train")
            rows.append(f"{kind}/{i}.png,{label},{split}")
    (data / "split.csv").write_text("\n".join(rows) + "\n")
    lines: list[str] = []
    argv = ["--data", str(data), "--image-size", "64", "--levels", "0", "1", "--resplits", "0", "1",
            "--threads", "1"]  # fmt: skip
    assert main(argv, emit=lines.append) == 0
    results = [json.loads(line) for line in lines[:-1]]
    assert [r["split"] for r in results] == ["split.csv", "re-draw 0", "re-draw 1"]
    assert all(r["auroc"] == 1.0 for r in results)
    assert lines[-1].startswith("fixed split AUROC 1.000; 2 re-draws 1.000")
