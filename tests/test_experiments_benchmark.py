"""The cross-dataset benchmark (tools/experiments/benchmark.py): splits, paired differences, the
selection rule, and one end-to-end run on tiny real images with the real Lite0 teacher."""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tools.experiments.benchmark import (
    _run_args,
    build_splits,
    main,
    paired_difference,
    parse_variant,
    render_table,
    rescored_rows,
    select,
    summarise,
)


def _images(root: Path, normals: int, abnormal: int) -> None:
    """Class sub-folders and a split.csv: dark uniform normals, anomalies with a bright blob."""
    rows = ["path,label,split"]
    rng = np.random.default_rng(0)
    for kind, n, label in (("normal", normals, 0), ("abnormal", abnormal, 1)):
        (root / kind).mkdir(parents=True)
        for i in range(n):
            pixels = rng.integers(40, 60, (32, 32)).astype(np.uint8)
            if label:
                pixels[8:20, 8:20] = 250
            Image.fromarray(pixels).save(root / kind / f"{i:03d}.png")
            split = "test" if label or i >= normals - 3 else ("val" if i < 2 else "train")
            rows.append(f"{kind}/{i:03d}.png,{label},{split}")
    (root / "split.csv").write_text("\n".join(rows) + "\n")


def _row(split: str, variant: str, seed: int, scores: list[float], labels: list[int],
         val: float | None = None, source: str = "s") -> dict:  # fmt: skip
    from sklearn.metrics import roc_auc_score

    row = {"split": split, "source": source, "variant": variant, "seed": seed,
           "test_scores": scores, "test_labels": labels,
           "auroc": roc_auc_score(labels, scores)}  # fmt: skip
    if val is not None:
        row["val_synthetic_auroc"] = val
    return row


def test_variant_names_and_augmentation_suffix() -> None:
    assert parse_variant("pdd-lite0").augment_views == 0
    v = parse_variant("pdd-lite0-sigma2@aug8")
    assert (v.config, v.augment_views, v.label) == ("pdd-lite0-sigma2", 8, "pdd-lite0-sigma2@aug8")
    with pytest.raises(ValueError, match="unknown variant"):
        parse_variant("pdd-nope")
    with pytest.raises(ValueError, match="@augK"):
        parse_variant("pdd-lite0@x")


def test_paired_difference_is_zero_for_equal_scores_and_positive_for_a_better_model() -> None:
    labels = [0] * 20 + [1] * 20
    rng = np.random.default_rng(1)
    noisy = list(rng.normal(size=40) + np.r_[np.zeros(20), 0.5 * np.ones(20)])
    perfect = [float(v) for v in np.r_[np.zeros(20), np.ones(20)]]
    same = paired_difference([_row("a", "x", 0, noisy, labels)], [_row("a", "y", 0, noisy, labels)])
    assert same == (0.0, 0.0, 0.0)
    d, lo, hi = paired_difference(
        [_row("a", "x", 0, perfect, labels)], [_row("a", "y", 0, noisy, labels)]
    )
    assert d > 0 and lo <= d <= hi and lo > 0


def test_selection_uses_validation_only_figures_averaged_per_source() -> None:
    labels = [0, 0, 1, 1]
    good_test, bad_test = [0.0, 0.1, 0.9, 1.0], [1.0, 0.9, 0.1, 0.0]
    rows = [
        # "a" wins on test everywhere but loses on validation: the rule must pick "b".
        _row("h1", "a", 0, good_test, labels, val=0.6, source="h"),
        _row("h2", "a", 0, good_test, labels, val=0.6, source="h"),
        _row("c1", "a", 0, good_test, labels, val=0.7, source="c"),
        _row("h1", "b", 0, bad_test, labels, val=0.9, source="h"),
        _row("h2", "b", 0, bad_test, labels, val=0.5, source="h"),
        _row("c1", "b", 0, bad_test, labels, val=0.8, source="c"),
    ]
    summary = summarise(rows)
    assert summary["variants"]["b"]["val_mean_over_sources"] == pytest.approx((0.7 + 0.8) / 2)
    assert summary["variants"]["a"]["test_mean_over_sources"] == 1.0
    assert select(summary) == "b"


def test_selection_among_pdd_candidates_ignores_the_baseline() -> None:
    labels = [0, 0, 1, 1]
    rows = [
        _row("h", "rd4ad-x", 0, [0, 0, 1, 1], labels, val=0.95, source="h"),
        _row("h", "pdd-a", 0, [0, 0, 1, 1], labels, val=0.80, source="h"),
        _row("h", "pdd-b", 0, [0, 0, 1, 1], labels, val=0.85, source="h"),
    ]
    summary = summarise(rows)
    assert select(summary) == "rd4ad-x"
    assert select(summary, "pdd") == "pdd-b"


def test_a_rescored_variant_is_paired_with_the_baseline_of_the_same_blur() -> None:
    labels = [0, 0, 1, 1]
    rows = [_row("h", v, 0, [0.1, 0.2, 0.8, 0.9], labels, val=0.8)
            for v in ("rd4ad-x", "rd4ad-x~sigma4", "pdd-a", "pdd-a~sigma4")]  # fmt: skip
    table = render_table(rows)
    assert "pdd-a~sigma4 − rd4ad-x~sigma4 on h:" in table and "pdd-a − rd4ad-x on h:" in table


def test_rescored_blurs_become_rows_of_their_own() -> None:
    row = _row("h", "pdd-a", 0, [0.1, 0.2, 0.8, 0.9], [0, 0, 1, 1], val=0.7)
    row["rescored"] = {"4": {"auroc": 0.5, "test_scores": [1, 2, 3, 4], "val_synthetic_auroc": 0.6}}
    (extra,) = rescored_rows(row)
    assert extra["variant"] == "pdd-a~sigma4" and extra["auroc"] == 0.5
    assert extra["val_synthetic_auroc"] == 0.6 and extra["test_scores"] == [1, 2, 3, 4]
    assert "rescored" not in extra and row["variant"] == "pdd-a"
    plain = _row("h", "pdd-a", 0, [0.1, 0.9], [0, 1])
    assert rescored_rows(plain) == []


def test_chest_epochs_apply_to_chest_splits_only(tmp_path: Path) -> None:
    _images(tmp_path / "headct", normals=73, abnormal=4)
    argv = argparse.Namespace(headct=tmp_path / "headct", resplits=0, chest=None, folder=[],
                              epochs=100, chest_epochs=40, image_size=32, out=tmp_path,
                              rescore_sigma=[4.0], resume=True)  # fmt: skip
    (split,) = build_splits(argv)
    run = _run_args(argv, split, parse_variant("pdd-lite0"))
    assert (run.epochs, run.rescore_sigmas, run.resume) == (100, [4.0], True)
    chest = dataclasses.replace(split, source="chest")
    assert _run_args(argv, chest, parse_variant("pdd-lite0")).epochs == 40


def test_only_keeps_the_named_splits_and_rejects_unknown_names(tmp_path: Path) -> None:
    _images(tmp_path / "headct", normals=73, abnormal=4)
    argv = argparse.Namespace(headct=tmp_path / "headct", resplits=3, chest=None, folder=[],
                              out=tmp_path, only=["headct-r0", "headct-r2"])  # fmt: skip
    assert [s.name for s in build_splits(argv)] == ["headct-r0", "headct-r2"]
    argv.only = None
    assert [s.name for s in build_splits(argv)] == [
        "headct-fixed",
        "headct-r0",
        "headct-r1",
        "headct-r2",
    ]
    argv.only = ["headct-r9"]
    with pytest.raises(ValueError, match="headct-r9"):
        build_splits(argv)


@pytest.mark.slow
def test_benchmark_command_end_to_end(tmp_path: Path) -> None:
    """Two variants on a HeadCT-like set (fixed split + one re-draw) and a site folder, 1 epoch:
    one row per split × variant, a table with intervals, means and the paired difference."""
    _images(tmp_path / "headct", normals=73, abnormal=4)
    _images(tmp_path / "site", normals=12, abnormal=4)
    out = tmp_path / "out"
    lines: list[str] = []
    argv = ["--headct", str(tmp_path / "headct"), "--resplits", "1",
            "--folder", f"site={tmp_path / 'site'}::{tmp_path / 'site' / 'split.csv'}",
            "--variants", "rd4ad-lite0", "pdd-lite0", "--epochs", "1", "--image-size", "32",
            "--out", str(out)]  # fmt: skip
    assert main(argv, emit=lines.append) == 0
    rows = [json.loads(ln) for ln in (out / "bench.jsonl").read_text().splitlines()]
    assert sorted((r["split"], r["variant"]) for r in rows) == sorted(
        (s, v) for s in ("headct-fixed", "headct-r0", "site") for v in ("rd4ad-lite0", "pdd-lite0")
    )
    assert all(len(r["test_scores"]) == len(r["test_labels"]) for r in rows)
    table = lines[-1]
    assert "| headct-r0 |" in table and "mean over sources (val, chooses)" in table
    assert "pdd-lite0 − rd4ad-lite0 on site:" in table and "chosen by the rule:" in table
    again: list[str] = []
    assert main(["--table", str(out / "bench.jsonl"), "--out", str(out)], emit=again.append) == 0
    assert again[-1] == table
    only_pdd: list[str] = []
    argv = ["--table", str(out / "bench.jsonl"), "--variants", "pdd-lite0", "--out", str(out)]
    assert main(argv, emit=only_pdd.append) == 0
    assert "pdd-lite0" in only_pdd[-1] and "rd4ad-lite0" not in only_pdd[-1]
