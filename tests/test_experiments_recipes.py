"""Experiment helpers behind docs/results.md: HeadCT re-splits and synthetic lesions."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from tools.experiments.recipes import headct_resplit_items, synthetic_lesions


def _headct_like(root: Path, normals: int = 12, abnormal: int = 5) -> None:
    rows = ["path,label,split"]
    for kind, n, label in (("normal", normals, 0), ("abnormal", abnormal, 1)):
        (root / kind).mkdir(parents=True)
        for i in range(n):
            pixels = np.full((8, 8), (10 * i) % 256, np.uint8)
            Image.fromarray(pixels).save(root / kind / f"{i:03d}.png")
            split = "test" if label or i >= normals - 3 else ("val" if i == 0 else "train")
            rows.append(f"{kind}/{i:03d}.png,{label},{split}")
    (root / "split.csv").write_text("\n".join(rows) + "\n")


def test_resplit_redraws_every_normal_and_keeps_every_abnormal(tmp_path: Path) -> None:
    _headct_like(tmp_path)
    items, test, desc = headct_resplit_items(tmp_path, draw=0, n_train=8)
    train = [it for it in items if it.split == "train"]
    assert len(train) == 8 and all(it.label == 0 for it in train)
    abnormal = sorted(it.rel for it in test if it.label == 1)
    assert abnormal == [f"abnormal/{i:03d}.png" for i in range(5)]
    test_normals = {it.rel for it in test if it.label == 0}
    assert len(test_normals) == 4 and not test_normals & {it.rel for it in train}
    assert {it.rel for it in items if it.label == 0} == {f"normal/{i:03d}.png" for i in range(12)}
    assert "re-split 0" in desc
    again, _, _ = headct_resplit_items(tmp_path, draw=0, n_train=8)
    assert [(it.rel, it.split) for it in again] == [(it.rel, it.split) for it in items]
    other, _, _ = headct_resplit_items(tmp_path, draw=1, n_train=8)
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


def test_resplit_command_trains_and_scores_every_draw(tmp_path: Path) -> None:
    """`python -m tools.experiments.recipes headct --resplits …` end to end: one row per draw, each
    trained on 70 normals and tested on the rest + every abnormal image (1 epoch, real Lite0)."""
    import json

    from tools.experiments.recipes import main

    _headct_like(tmp_path / "data", normals=72, abnormal=3)
    out = tmp_path / "out"
    lines: list[str] = []
    argv = ["headct", "--data", str(tmp_path / "data"), "--out", str(out), "--epochs", "1",
            "--seeds", "0", "--variants", "rd4ad-lite0", "--resplits", "0", "1"]  # fmt: skip
    assert main(argv, emit=lines.append) == 0
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert [r["split_tag"] for r in rows] == ["-resplit_r0", "-resplit_r1"]
    for r in rows:
        assert (r["n_train"], r["n_test_normal"], r["n_test_anomalous"]) == (70, 2, 3)
        assert 0.0 <= r["auroc"] <= 1.0 and (out / Path(r["checkpoint"]).name).is_dir()
    assert "headct-resplit" in lines[-1]  # the summary table
