"""Out-of-distribution slices of the embedded head-CT default (docs/results.md, issue 14 item 4).

Measures, in-process (no Ray):

* on a real head CT (the CQ500 series in ../shared/data/dicom), each slice's score, whether the
  default flags it, its level and its distance to the default's training slices;
* the in-distribution check fitted exactly as ``pdd-batch train`` fits it (the training images'
  cached views, ``model.ood.fit_ood``), and what it changes: CQ500 flagged before/after, HeadCT
  test AUROC (scores are unchanged by construction) and flagged rates of test normals/abnormals.

``--write`` adds the check to the model (``model.checkpoint.set_ood``); ``--model DIR`` checks a
checkpoint other than the embedded head-CT default (e.g. a candidate default). A checkpoint that
holds its own check (``ood.safetensors``, fitted by ``train``) is measured with it; the refit is
only for one without. ``--levels N`` also prints the CQ500 series as a Markdown table, one row
per N slices along z (inferior -> superior): normal / flagged / out of distribution;
``--table OUT.json --model DIR`` prints that table from a report written before.

    PYTHONPATH=. .venv/bin/python -m tools.experiments.ood_check [--write]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from jobs.train import TrainConfig, augmented_views, select_training_items
from model.checkpoint import load_checkpoint, set_ood
from model.default import default_model_path
from model.ood import OODCheck, capture_teacher, fit_ood, pool_levels
from model.train_step import feature_bank
from pdd_batch.evaluation.datasets import list_images
from pdd_batch.evaluation.metrics import auroc_ci, image_metrics
from pdd_batch.ingest.discovery import discover
from pdd_batch.ingest.preprocess import PreprocessSpec, load_image_file
from pdd_batch.ingest.slicing import iter_model_slices
from pdd_batch.ingest.volume import load_series

SHARED = Path(__file__).resolve().parents[2] / ".." / "shared" / "data"
HEADCT = SHARED / "headct"
CQ500 = SHARED / "dicom" / "cq500_ct1_head_ct"


def _score(model: torch.nn.Module, check: OODCheck | None, x: np.ndarray, batch: int = 16):
    """Scores (N,) and distances (N,; NaN without a check) of (N, S, S) images."""
    scores, dists = [], []
    for start in range(0, len(x), batch):
        xb = torch.from_numpy(x[start : start + batch]).unsqueeze(1)  # (B, 1, S, S)
        with torch.inference_mode(), capture_teacher(model) as pooled:
            scores.append(model.predict(xb).scores.numpy())
        dist = check.distance(torch.cat(pooled)).numpy() if check else np.full(len(xb), np.nan)
        dists.append(dist)
    return np.concatenate(scores), np.concatenate(dists)


def fit_default_check(model: torch.nn.Module, spec: PreprocessSpec, meta: dict) -> OODCheck:
    """The check ``train_model`` would have fitted for the default: its training images' views."""
    run_d = meta["training"]["run"]
    run = TrainConfig(seed=run_d["seed"], augment_views=run_d["augment_views"])
    items = select_training_items(list_images(HEADCT, HEADCT / "split.csv", "train"), run)
    images = np.stack([load_image_file(it.path, spec) for it in items])  # (N, S, S)
    if run.augment_views > 1:
        images = augmented_views(images, run.augment_views, run.seed)  # (N * K, S, S)
    bank = feature_bank(model, torch.from_numpy(images).unsqueeze(1), run.feature_batch)
    groups = torch.arange(len(images)) // max(run.augment_views, 1)
    return fit_ood(pool_levels(bank[0]), seed=run.seed, groups=groups)


def headct_test(model, check, spec, threshold) -> dict:
    items = list_images(HEADCT, HEADCT / "split.csv", "test")
    x = np.stack([load_image_file(it.path, spec) for it in items])
    labels = np.array([it.label for it in items])
    scores, dists = _score(model, check, x)
    ood = dists > check.threshold
    flagged_before = scores > threshold
    flagged_after = flagged_before & ~ood
    auroc = image_metrics(labels, scores)["auroc"]
    out = {"n_test": len(items), "auroc": auroc, "auroc_ci95": auroc_ci(labels, scores)}
    for name, lab in (("normal", 0), ("abnormal", 1)):
        sel = labels == lab
        out[name] = {
            "n": int(sel.sum()),
            "flagged_before": int(flagged_before[sel].sum()),
            "flagged_after": int(flagged_after[sel].sum()),
            "out_of_distribution": int(ood[sel].sum()),
        }
    return out


def cq500(model, check, spec, threshold) -> dict:
    disc = discover(CQ500)
    rows = []
    for ref in disc.series:
        slices = list(iter_model_slices(load_series(disc.root, ref), spec))
        x = np.stack([s.image for s in slices])
        scores, dists = _score(model, check, x)
        for s, sc, d in zip(slices, scores, dists, strict=True):
            rows.append({"series": ref.series_key[:8], "n": len(slices), "slice": s.slice_index,
                         "score": float(sc), "dist": float(d)})  # fmt: skip
    flagged = [r for r in rows if r["score"] > threshold]
    ood = [r for r in rows if r["dist"] > check.threshold]
    after = [r for r in flagged if r["dist"] <= check.threshold]
    return {
        "n_slices": len(rows),
        "flagged_before": len(flagged),
        "out_of_distribution": len(ood),
        "flagged_after": len(after),
        "slices": rows,
    }


def collect(model, spec, meta, threshold) -> dict[str, np.ndarray]:
    """Pooled teacher features (all levels, concatenated) and scores of every image the
    measurement needs, so that variants of the check are fitted without recomputing them."""
    run_d = meta["training"]["run"]
    run = TrainConfig(seed=run_d["seed"], augment_views=run_d["augment_views"])
    items = select_training_items(list_images(HEADCT, HEADCT / "split.csv", "train"), run)
    images = np.stack([load_image_file(it.path, spec) for it in items])  # (N, S, S)
    views = max(run.augment_views, 1)
    if views > 1:
        images = augmented_views(images, views, run.seed)  # (N * K, S, S)
    bank = feature_bank(model, torch.from_numpy(images).unsqueeze(1), run.feature_batch)
    test = list_images(HEADCT, HEADCT / "split.csv", "test")
    x = np.stack([load_image_file(it.path, spec) for it in test])
    out = {
        "train": pool_levels(bank[0]).numpy(),
        "groups": np.arange(len(images)) // views,
        "test_labels": np.array([it.label for it in test]),
        "threshold": np.array(threshold),
    }
    out["test_scores"], out["test"] = _scores_feats(model, x)
    disc = discover(CQ500)
    feats, scores, idx = [], [], []
    for ref in disc.series:
        slices = list(iter_model_slices(load_series(disc.root, ref), spec))
        sc, f = _scores_feats(model, np.stack([s.image for s in slices]))
        feats.append(f), scores.append(sc), idx.extend(s.slice_index for s in slices)
    out.update(cq=np.concatenate(feats), cq_scores=np.concatenate(scores), cq_slice=np.array(idx))
    return out  # fmt: skip


def _scores_feats(model, x: np.ndarray, batch: int = 16) -> tuple[np.ndarray, np.ndarray]:
    scores, feats = [], []
    for start in range(0, len(x), batch):
        xb = torch.from_numpy(x[start : start + batch]).unsqueeze(1)  # (B, 1, S, S)
        with torch.inference_mode(), capture_teacher(model) as pooled:
            scores.append(model.predict(xb).scores.numpy())
        feats.append(torch.cat(pooled).numpy())
    return np.concatenate(scores), np.concatenate(feats)


LITE0_CHANNELS = (24, 40, 112, 320)  # the default's teacher levels 1-4


def _columns(levels: tuple[int, ...]) -> np.ndarray:
    edges = np.cumsum((0, *LITE0_CHANNELS))
    return np.concatenate([np.arange(edges[i], edges[i + 1]) for i in levels])


def variants(cache: dict[str, np.ndarray]) -> list[dict]:
    """Each candidate check (teacher levels x training quantile), fitted on the training views
    (leave-one-image-out), and what it does to HeadCT test and CQ500."""
    thr = float(cache["threshold"])
    labels = cache["test_labels"]
    out = []
    for levels in ((0, 1, 2, 3), (3,), (2, 3), (2,)):
        cols = _columns(levels)
        for q in (0.99, 1.0):
            groups = torch.from_numpy(cache["groups"])
            check = fit_ood(torch.from_numpy(cache["train"][:, cols]), quantile=q, groups=groups)
            ood_t = (
                check.distance(torch.from_numpy(cache["test"][:, cols])).numpy() > check.threshold
            )
            ood_c = check.distance(torch.from_numpy(cache["cq"][:, cols])).numpy() > check.threshold
            flag_t, flag_c = cache["test_scores"] > thr, cache["cq_scores"] > thr
            row = {"levels": [i + 1 for i in levels], "quantile": q}
            for name, lab in (("normal", 0), ("abnormal", 1)):
                sel = labels == lab
                row[name] = {"n": int(sel.sum()), "ood": int(ood_t[sel].sum()),
                             "flagged": int(flag_t[sel].sum()),
                             "flagged_after": int((flag_t & ~ood_t)[sel].sum())}  # fmt: skip
            row["cq500"] = {"n": len(flag_c), "ood": int(ood_c.sum()), "flagged": int(flag_c.sum()),
                            "flagged_after": int((flag_c & ~ood_c).sum())}  # fmt: skip
            out.append(row)
    return out


def level_table(report: dict, per_row: int) -> str:
    """The CQ500 slices of ``report`` (``main``'s JSON) as Markdown, series by series (series of
    one slice skipped), ``per_row`` slices a row along z (inferior -> superior): each slice is
    out of distribution (distance above the check's threshold), else flagged (score above the
    model's), else normal; with the row's median score, and a total row per series."""
    threshold, ood_threshold = report["threshold"], report["check"]["threshold"]
    lines = ["| series, slices (z) | normal | flagged | out of distribution | median score |",
             "|---|---|---|---|---|"]  # fmt: skip
    series = sorted({r["series"] for r in report["cq500"]["slices"]})
    for key in series:
        ordered = sorted((r for r in report["cq500"]["slices"] if r["series"] == key),
                         key=lambda r: r["slice"])  # fmt: skip
        if len(ordered) < 2:
            continue
        counts = np.zeros(3, dtype=int)
        for start in range(0, len(ordered), per_row):
            part = ordered[start : start + per_row]
            ood = sum(r["dist"] > ood_threshold for r in part)
            flagged = sum(r["score"] > threshold and r["dist"] <= ood_threshold for r in part)
            row = np.array([len(part) - ood - flagged, flagged, ood])
            counts += row
            median = float(np.median([r["score"] for r in part]))
            lines.append(f"| {key}, {part[0]['slice']}-{part[-1]['slice']} | {row[0]} | {row[1]} "
                         f"| {row[2]} | {median:.2f} |")  # fmt: skip
        lines.append(f"| **{key}, all {len(ordered)}** | **{counts[0]}** | **{counts[1]}** "
                     f"| **{counts[2]}** | |")  # fmt: skip
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--model",
        type=Path,
        default=None,
        help="a checkpoint folder (default: the embedded head-CT default)",
    )
    parser.add_argument("--write", action="store_true", help="add the check to the model")
    parser.add_argument("--out", type=Path, default=Path("ood_check.json"))
    parser.add_argument("--cache", type=Path, help="write the features and scores (.npz), stop")
    parser.add_argument("--variants", type=Path, help="compare checks on a --cache file")
    parser.add_argument("--levels", type=int, default=0, help="CQ500 table, N slices per row")
    parser.add_argument("--table", type=Path, help="print the CQ500 table of a written --out")
    parser.add_argument("--shared", type=Path, help=f"the shared data folder (default {SHARED})")
    args = parser.parse_args()
    if args.shared:  # a worktree elsewhere than beside ../shared
        global HEADCT, CQ500
        HEADCT, CQ500 = args.shared / "headct", args.shared / "dicom" / "cq500_ct1_head_ct"
    model_dir = args.model or default_model_path()
    if args.table:  # a report written before: its CQ500 table only
        report = json.loads(args.table.read_text())
        report.setdefault("threshold", float(load_checkpoint(model_dir).calibration["threshold"]))
        print(level_table(report, args.levels or 5))
        return
    if args.variants:
        cache = dict(np.load(args.variants))
        for row in variants(cache):
            print(json.dumps(row))
        if args.write:  # the check train_model fits: all levels, 0.99, one group per image
            groups = torch.from_numpy(cache["groups"])
            check = fit_ood(torch.from_numpy(cache["train"]), groups=groups)
            set_ood(model_dir, check)
            print("written to", model_dir, json.dumps(check.info()))
        return
    torch.set_num_threads(2)
    loaded = load_checkpoint(model_dir)
    model, meta = loaded.model, loaded.meta
    spec = PreprocessSpec.from_dict(loaded.preprocessing)
    threshold = float(loaded.calibration["threshold"])
    if args.cache:
        np.savez(args.cache, **collect(model, spec, meta, threshold))
        return
    check = loaded.ood if loaded.ood is not None else fit_default_check(model, spec, meta)
    report = {
        "threshold": threshold,
        "check": check.info(),
        "headct_test": headct_test(model, check, spec, threshold),
        "cq500": cq500(model, check, spec, threshold),
    }
    args.out.write_text(json.dumps(report, indent=1))
    summary = {k: v for k, v in report["cq500"].items() if k != "slices"}
    print(json.dumps({"check": report["check"], "headct": report["headct_test"], "cq500": summary}))
    if args.levels:
        print(level_table(report, args.levels))
    if args.write:
        set_ood(model_dir, check)
        print("written to", model_dir)


if __name__ == "__main__":
    main()
