"""Experiment helpers behind docs/results.md: HeadCT re-splits and synthetic lesions."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from jobs.experiments import headct_resplit_items, synthetic_lesions


def _headct_like(root: Path, normals: int = 12, abnormal: int = 5) -> None:
    rows = ["path,label,split"]
    for kind, n, label in (("normal", normals, 0), ("abnormal", abnormal, 1)):
        (root / kind).mkdir(parents=True)
        for i in range(n):
            Image.fromarray(np.full((8, 8), 10 * i, np.uint8)).save(root / kind / f"{i:03d}.png")
            split = "test" if label or i >= normals - 3 else ("val" if i == 0 else "train")
            rows.append(f"{kind}/{i:03d}.png,{label},{split}")
    (root / "split.csv").write_text("\n".join(rows) + "\n")


def test_resplit_redraws_every_normal_and_keeps_every_abnormal(tmp_path: Path) -> None:
    _headct_like(tmp_path)
    items, test, desc = headct_resplit_items(tmp_path, split=0, n_train=8)
    train = [it for it in items if it.split == "train"]
    assert len(train) == 8 and all(it.label == 0 for it in train)
    abnormal = sorted(it.rel for it in test if it.label == 1)
    assert abnormal == [f"abnormal/{i:03d}.png" for i in range(5)]
    test_normals = {it.rel for it in test if it.label == 0}
    assert len(test_normals) == 4 and not test_normals & {it.rel for it in train}
    assert {it.rel for it in items if it.label == 0} == {f"normal/{i:03d}.png" for i in range(12)}
    assert "re-split 0" in desc
    again, _, _ = headct_resplit_items(tmp_path, split=0, n_train=8)
    assert [(it.rel, it.split) for it in again] == [(it.rel, it.split) for it in items]
    other, _, _ = headct_resplit_items(tmp_path, split=1, n_train=8)
    assert {it.rel for it in other if it.split == "train"} != {it.rel for it in train}


def test_synthetic_lesions_brighten_only_tissue() -> None:
    images = np.zeros((2, 32, 32), np.float32)
    images[:, 8:24, 8:24] = 0.4  # a square "head" on black background
    out = synthetic_lesions(images, per_image=3, seed=0)
    assert out.shape == (6, 32, 32)
    changed = np.abs(out - np.repeat(images, 3, axis=0)) > 1e-6
    assert changed.any(axis=(1, 2)).all()  # every copy got a lesion
    assert not changed[:, images[0] == 0].any()  # never on the background
    assert out.max() <= 0.95 + 1e-6
