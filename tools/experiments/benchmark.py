"""Cross-dataset quality benchmark: each configuration trained and evaluated on every dataset given.

A command of its own (not a test); prints one table: per-split test AUROC with its bootstrap
interval, validation-only figures, the mean over data sources, and PDD − RD4AD paired. E.g.::

    nice -n 5 python -m tools.experiments.benchmark --headct ../shared/data/headct --resplits 5 \
        --chest ../shared/data/chestxray --chest-train 50 100 240 \
        --variants pdd-lite0-sigma2@aug8 rd4ad-lite0-sigma2 --out runs/bench

A variant is a ``recipes.VARIANTS`` name, optionally ``@augK`` (K cached augmented views per
image). Data sources: HeadCT (its fixed ``split.csv`` and ``--resplits`` random 70/30+100 re-draws
of its normals), chest X-ray (a patient-level split; ``--chest-train`` caps on training normals)
and any ``--folder NAME=PATH[::SPLIT_CSV]`` a site passes (class sub-folders or a split CSV).

The selection rule (written before any run; ``select``): the chosen configuration is the one with
the highest mean over data sources of the validation-only figure, the synthetic-lesion AUROC on
held-out validation normals (``val_synthetic_auroc``; no test image is read to compute it); a
source's figure is the mean over its splits that have validation normals. Test figures are
reported, never used to choose.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pdd_batch.evaluation.datasets import ImageItem, list_images
from pdd_batch.evaluation.metrics import _auroc_by_ranks, auroc_ci
from tools.experiments.recipes import (
    VARIANTS,
    chest_items,
    headct_items,
    headct_resplit_items,
    run_one,
)

log = logging.getLogger("tools.experiments.benchmark")


@dataclass(frozen=True)
class Split:
    """One train/test split of one data source."""

    source: str  # "headct", "chest", or a site folder's name
    name: str  # e.g. "headct-fixed", "headct-r3", "chest-n50"
    items: list[ImageItem]  # train (+ val) + test
    test: list[ImageItem]
    desc: str
    max_train: int | None = None


@dataclass(frozen=True)
class Variant:
    """A ``recipes.VARIANTS`` configuration with its training-time augmentation."""

    label: str  # as given, e.g. "pdd-lite0-sigma2@aug8"
    config: str  # the VARIANTS key
    augment_views: int = 0


def parse_variant(text: str) -> Variant:
    """``NAME`` or ``NAME@augK`` → Variant; unknown names are an error naming them."""
    name, _, aug = text.partition("@")
    if name not in VARIANTS:
        raise ValueError(f"unknown variant {name!r} (one of {sorted(VARIANTS)})")
    if aug and not (aug.startswith("aug") and aug[3:].isdigit()):
        raise ValueError(f"variant suffix must be @augK, got {text!r}")
    return Variant(text, name, int(aug[3:]) if aug else 0)


DEFAULT_VARIANTS = ("pdd-lite0", "rd4ad-lite0")  # what a run without --variants trains


def build_splits(args: argparse.Namespace) -> list[Split]:
    """Every split the arguments name, in a fixed order."""
    splits: list[Split] = []
    if args.headct:
        items, test, desc = headct_items(args.headct)
        splits.append(Split("headct", "headct-fixed", items, test, desc))
        for draw in range(args.resplits):
            items, test, desc = headct_resplit_items(args.headct, draw)
            splits.append(Split("headct", f"headct-r{draw}", items, test, desc))
    if args.chest:
        for cap in args.chest_train or [None]:
            items, test, desc = chest_items(args.chest, args.out, 0, cap)
            name = "chest" if cap is None else f"chest-n{cap}"
            splits.append(Split("chest", name, items, test, desc, cap))
    for spec in args.folder:
        name, _, rest = spec.partition("=")
        path, _, split_csv = rest.partition("::")
        items = list_images(Path(path), Path(split_csv) if split_csv else None)
        test = [it for it in items if it.split == "test"]
        if not test:
            raise ValueError(f"--folder {name}: no 'test' split (give a split CSV)")
        splits.append(Split(name, name, items, test, f"site data {name}"))
    only = getattr(args, "only", None)
    if only:
        unknown = sorted(set(only) - {s.name for s in splits})
        if unknown:
            raise ValueError(f"--only: no split named {', '.join(unknown)}")
        splits = [s for s in splits if s.name in only]
    return splits


def _run_args(args: argparse.Namespace, split: Split, variant: Variant) -> argparse.Namespace:
    """The namespace ``recipes.run_one`` reads, for one split and variant."""
    chest_epochs = getattr(args, "chest_epochs", None)
    epochs = chest_epochs if split.source == "chest" and chest_epochs else args.epochs
    return argparse.Namespace(
        dataset=split.name, epochs=epochs, image_size=args.image_size, batch_size=16,
        augment_views=variant.augment_views, max_train=split.max_train, out=args.out / split.name,
        stretch=False, track_every=0, rescore_sigmas=getattr(args, "rescore_sigma", None) or (),
        resume=getattr(args, "resume", False),
    )  # fmt: skip


def rescored_rows(row: dict[str, Any]) -> list[dict[str, Any]]:
    """One extra row per re-scored blur (``row["rescored"]``), labelled ``VARIANT~sigmaS``: the
    same trained model scored with anomaly-map blur S."""
    extra = []
    for sigma, figures in row.get("rescored", {}).items():
        new = {k: v for k, v in row.items() if k not in ("rescored", "val_synthetic_auroc")}
        new.update(figures, variant=f"{row['variant']}~sigma{sigma}")
        extra.append(new)
    return extra


def run_benchmark(
    args: argparse.Namespace, emit: Callable[[str], None] = print
) -> list[dict[str, Any]]:
    """Train and score every variant × seed on every split; rows appended to OUT/bench.jsonl."""
    rows: list[dict[str, Any]] = []
    args.out.mkdir(parents=True, exist_ok=True)
    with (args.out / "bench.jsonl").open("a") as fh:
        for split in build_splits(args):
            cache: dict[Any, Any] = {}  # teacher features, shared by the variants of one split
            for variant in [parse_variant(v) for v in args.variants]:
                for seed in args.seeds:
                    t0 = time.perf_counter()
                    run_args = _run_args(args, split, variant)
                    run_args.out.mkdir(parents=True, exist_ok=True)
                    row = run_one(variant.config, seed, run_args, split.items, split.test,
                                  split.desc, cache)  # fmt: skip
                    row.update(source=split.source, split=split.name, variant=variant.label,
                               test_labels=[it.label for it in split.test],
                               wall_s=round(time.perf_counter() - t0, 1))  # fmt: skip
                    for r in [row, *rescored_rows(row)]:
                        r.pop("rescored", None)
                        rows.append(r)
                        fh.write(json.dumps(r) + "\n")
                        val = r.get("val_synthetic_auroc")
                        emit(f"{split.name} {r['variant']} s{seed}: AUROC {r['auroc']:.3f}"
                             + ("" if val is None else f", val-syn {val:.3f}")
                             + f" ({row['wall_s']:.0f} s)")  # fmt: skip
                    fh.flush()
    return rows


def _kept_labels(row: dict[str, Any]) -> np.ndarray:
    return np.asarray(row["test_labels"][: len(row["test_scores"])])


def paired_difference(
    a_rows: Sequence[dict[str, Any]], b_rows: Sequence[dict[str, Any]], n_resamples: int = 1000
) -> tuple[float, float, float]:
    """AUROC(a) − AUROC(b) on one split, averaged over the seeds both have, with a paired,
    class-stratified bootstrap 95% interval (the same test images resampled for both).

    Every resample's AUROC comes from ranks at once (ties count half: ``roc_auc_score``'s
    figure), not from one ``roc_auc_score`` call per resample, seed and model."""
    seeds = sorted({r["seed"] for r in a_rows} & {r["seed"] for r in b_rows})
    a = np.array([next(r for r in a_rows if r["seed"] == s)["test_scores"] for s in seeds])
    b = np.array([next(r for r in b_rows if r["seed"] == s)["test_scores"] for s in seeds])
    y = _kept_labels(a_rows[0])  # (N,)
    pos, neg = np.flatnonzero(y == 1), np.flatnonzero(y == 0)
    rng = np.random.default_rng(0)
    draws = [(rng.choice(pos, pos.size), rng.choice(neg, neg.size)) for _ in range(n_resamples)]

    def diff(p: np.ndarray, q: np.ndarray) -> np.ndarray:
        """Mean over seeds of AUROC(a) − AUROC(b) on positives ``p`` (R, n1) and negatives
        ``q`` (R, n0) of each resample: (R,)."""
        auroc_a = _auroc_by_ranks(a[:, p], a[:, q])  # (S, R)
        auroc_b = _auroc_by_ranks(b[:, p], b[:, q])  # (S, R)
        return np.mean(auroc_a - auroc_b, axis=0)

    point = float(diff(pos[None], neg[None])[0])
    boots = diff(np.stack([p for p, _ in draws]), np.stack([q for _, q in draws]))  # (R,)
    lo, hi = np.percentile(boots, [2.5, 97.5])
    return point, float(lo), float(hi)


def summarise(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Per split × variant: mean test AUROC over seeds, its interval (seed-mean scores), and the
    validation-only figure; per variant: means over data sources (each source = mean of its
    splits)."""
    cells: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        cells[(r["split"], r["variant"])].append(r)
    table = {}
    for (split, variant), rs in cells.items():
        y = _kept_labels(rs[0])
        mean_scores = np.mean([r["test_scores"] for r in rs], axis=0)  # (N,)
        vals = [r["val_synthetic_auroc"] for r in rs if "val_synthetic_auroc" in r]
        table[(split, variant)] = {
            "source": rs[0]["source"], "auroc": float(np.mean([r["auroc"] for r in rs])),
            "ci": auroc_ci(y, mean_scores), "val": float(np.mean(vals)) if vals else None,
            "seeds": len(rs),
        }  # fmt: skip
    by_variant: dict[str, dict[str, Any]] = {}
    for variant in dict.fromkeys(r["variant"] for r in rows):
        per_source: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
        for (_, v), c in table.items():
            if v == variant:
                per_source[c["source"]]["auroc"].append(c["auroc"])
                if c["val"] is not None:
                    per_source[c["source"]]["val"].append(c["val"])
        test_means = [np.mean(s["auroc"]) for s in per_source.values()]
        val_means = [np.mean(s["val"]) for s in per_source.values() if s["val"]]
        by_variant[variant] = {
            "test_mean_over_sources": float(np.mean(test_means)),
            "val_mean_over_sources": float(np.mean(val_means)) if val_means else None,
        }
    return {"cells": table, "variants": by_variant}


def select(summary: dict[str, Any], prefix: str | None = None) -> str | None:
    """The rule: the variant with the highest mean over sources of the validation-only figure
    (among the variants whose label starts with ``prefix``, when given: "pdd" = the candidates
    for ``train``'s default, RD4AD being the baseline)."""
    scored = {v: s["val_mean_over_sources"] for v, s in summary["variants"].items()
              if s["val_mean_over_sources"] is not None
              and (prefix is None or v.startswith(prefix))}  # fmt: skip
    return max(scored, key=scored.__getitem__) if scored else None


def render_table(rows: Sequence[dict[str, Any]], baseline_prefix: str = "rd4ad") -> str:
    """The markdown table: splits × variants, the means over sources, PDD − RD4AD paired."""
    summary = summarise(rows)
    variants = list(summary["variants"])
    splits = list(dict.fromkeys(r["split"] for r in rows))
    head = "| split | " + " | ".join(variants) + " |"
    lines = [head, "|---" * (len(variants) + 1) + "|"]
    for split in splits:
        cells = []
        for v in variants:
            c = summary["cells"].get((split, v))
            if c is None:
                cells.append("")
                continue
            val = f"; val {c['val']:.3f}" if c["val"] is not None else ""
            cells.append(f"{c['auroc']:.3f} [{c['ci'][0]:.3f}–{c['ci'][1]:.3f}]{val}")
        lines.append(f"| {split} | " + " | ".join(cells) + " |")
    for key, label in (("test_mean_over_sources", "mean over sources (test)"),
                       ("val_mean_over_sources", "mean over sources (val, chooses)")):  # fmt: skip
        vals = [summary["variants"][v][key] for v in variants]
        shown = " | ".join("" if x is None else f"{x:.3f}" for x in vals)
        lines.append(f"| **{label}** | {shown} |")
    lines.append("")
    lines.append(f"chosen by the rule: {select(summary)}")
    if any(v.startswith("pdd") for v in variants):
        lines.append(f"chosen by the rule among PDD candidates: {select(summary, 'pdd')}")
    baselines = [v for v in variants if v.startswith(baseline_prefix)]
    for v in variants:
        if v in baselines or not baselines:
            continue
        base = _matching_baseline(v, baselines)
        diffs = []
        for split in splits:
            a = [r for r in rows if r["split"] == split and r["variant"] == v]
            b = [r for r in rows if r["split"] == split and r["variant"] == base]
            if a and b:
                d, lo, hi = paired_difference(a, b)
                diffs.append(d)
                lines.append(f"{v} − {base} on {split}: {d:+.3f} [{lo:+.3f}, {hi:+.3f}]")
        if diffs:
            lines.append(f"{v} − {base}, mean over splits: {np.mean(diffs):+.3f}")
    return "\n".join(lines)


def _matching_baseline(variant: str, baselines: Sequence[str]) -> str:
    """The baseline with the same blur (``~sigmaS`` suffix) as ``variant``, else the first."""
    suffix = variant.partition("~")[2]
    same = [b for b in baselines if b.partition("~")[2] == suffix]
    return (same or list(baselines))[0]


def main(argv: list[str] | None = None, emit: Callable[[str], None] = print) -> int:
    """Command-line entry point (``python -m tools.experiments.benchmark``)."""
    p = argparse.ArgumentParser(prog="python -m tools.experiments.benchmark", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--variants", nargs="+", default=None,
                   help=f"variants to run (default: {' '.join(DEFAULT_VARIANTS)}); with --table, "
                   "the variants whose rows are tabled (default: all)")  # fmt: skip
    p.add_argument("--headct", type=Path, help="HeadCT folder (with split.csv)")
    p.add_argument("--resplits", type=int, default=5, help="HeadCT re-draws (0: fixed split only)")
    p.add_argument("--chest", type=Path, help="chest X-ray folder (with index.csv)")
    p.add_argument("--chest-train", type=int, nargs="*", default=[],
                   help="caps on chest training normals, one split each (default: all)",
                   )  # fmt: skip
    p.add_argument("--folder", action="append", default=[], metavar="NAME=PATH[::SPLIT_CSV]")
    p.add_argument("--only", nargs="+", metavar="SPLIT",
                   help="run only these splits (e.g. headct-r0 chest-n240): adds runs to an "
                   "earlier benchmark without repeating its splits")  # fmt: skip
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--epochs", type=int, default=100)
    p.add_argument("--chest-epochs", type=int, default=None,
                   help="epochs on the chest splits (default: --epochs)")  # fmt: skip
    p.add_argument("--rescore-sigma", type=float, nargs="*", default=[],
                   help="also score every trained model with these anomaly-map blurs "
                   "(extra rows VARIANT~sigmaS; σ changes scoring only)")  # fmt: skip
    p.add_argument("--image-size", type=int, default=128)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue each run from its OUT/.../resume.pt (an interrupted benchmark)",
    )
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--table", nargs="*", type=Path, help="only print the table of these files")
    args = p.parse_args(argv)
    if args.table:
        rows = [json.loads(ln) for f in args.table for ln in f.read_text().splitlines()]
        if args.variants:
            rows = [r for r in rows if r["variant"] in args.variants]
        emit(render_table(rows))
        return 0
    args.variants = args.variants or list(DEFAULT_VARIANTS)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(message)s")
    torch.set_num_threads(args.threads)
    rows = run_benchmark(args, emit)
    emit(render_table(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
