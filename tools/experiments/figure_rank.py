"""Does the synthetic-lesion figure rank models as test AUROC does? (issue 23, docs/results.md)

Re-scores the checkpoints of ``tools.experiments.benchmark`` runs (``bench.jsonl`` rows: checkpoint
folder, test AUROC, the old single-family figure ``val_synthetic_auroc``) with the figure
``pdd-batch train`` now chooses by (``jobs.evaluate.synthetic_figure_of``: five lesion families
on the same validation normals) and prints, per data source, the Spearman rank correlation of each
figure with test AUROC over all candidates and seeds. No test image is read here: the test AUROCs
come from the benchmark rows. E.g.::

    python -m tools.experiments.figure_rank --headct ../shared/data/headct \\
        --chest ../shared/data/chestxray runs/rank_headct/bench.jsonl runs/rank_chest/bench.jsonl
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy.stats import spearmanr
from sklearn.metrics import roc_auc_score

from jobs.evaluate import score_arrays, synthetic_figure_of
from jobs.train import load_images
from model.checkpoint import load_checkpoint
from pdd_batch.evaluation.datasets import list_images
from pdd_batch.evaluation.synthetic import bright_ellipses
from pdd_batch.ingest.preprocess import PreprocessSpec


def validation_items(row: dict[str, Any], args: argparse.Namespace) -> list[Any]:
    """The validation normals of a benchmark row's split (HeadCT or chest; never test rows)."""
    if row["source"] == "headct":
        return list_images(args.headct, args.headct / "split.csv", "val")
    ck = Path(row["checkpoint"])
    split_csv = next(p / "chest_split.csv" for p in ck.parents if (p / "chest_split.csv").is_file())
    return list_images(args.chest, split_csv, "val")


def _old_figure(model: Any, images: np.ndarray) -> float:
    """The earlier figure ("val-syn"): normals vs ``bright_ellipses`` copies (3 each, seed 0)."""
    copies = bright_ellipses(images)
    labels = np.r_[np.zeros(len(images)), np.ones(len(copies))]
    scores = np.r_[score_arrays(model, images), score_arrays(model, copies)]
    return float(roc_auc_score(labels, scores))


def _test_auroc(model: Any, row: dict[str, Any], args: argparse.Namespace, spec: Any,
                cache: dict[Any, Any]) -> float:  # fmt: skip
    """Test AUROC of a re-scored model (HeadCT's fixed split; for the correlation only)."""
    key = ("test", row["split"], spec.image_size)
    if key not in cache:
        items = list_images(args.headct, args.headct / "split.csv", "test")
        images, kept, _ = load_images(items, spec)
        cache[key] = (images, np.array([it.label for it in kept]))
    images, labels = cache[key]
    return float(roc_auc_score(labels, score_arrays(model, images)))


def rescore(rows: Sequence[dict[str, Any]], args: argparse.Namespace) -> list[dict[str, Any]]:
    """Each row with ``new_figure`` (the five-family figure of its checkpoint) added; with
    ``--sigmas`` (HeadCT rows), one row per blur, its test AUROC and old figure re-computed."""
    cache: dict[Any, Any] = {}
    out = []
    for row in rows:
        loaded = load_checkpoint(Path(row["checkpoint"]))
        spec = PreprocessSpec.from_dict(loaded.preprocessing)
        key = (row["split"], spec.image_size)
        if key not in cache:
            cache[key], _, _ = load_images(validation_items(row, args), spec)
        _, _, sigma = row["variant"].partition("~sigma")
        original = loaded.model.config
        blurs = [float(sigma)] if sigma else [None]
        if args.sigmas and row["source"] == "headct" and not sigma:
            blurs = list(args.sigmas)
        for blur in blurs:
            new = dict(row)
            if blur is not None:  # the same weights scored with another anomaly-map blur
                loaded.model.config = replace(original, map_sigma=blur)
                if not sigma:
                    new["variant"] = f"{row['variant'].split('~')[0]}~sigma{blur:g}"
                    new["auroc"] = _test_auroc(loaded.model, row, args, spec, cache)
                    new["val_synthetic_auroc"] = _old_figure(loaded.model, cache[key])
            new["new_figure"] = synthetic_figure_of(loaded.model, cache[key], seed=0)
            out.append(new)
    return out


def rank_table(rows: Sequence[dict[str, Any]]) -> str:
    """Per-run figures and, per source, Spearman(figure, test AUROC) before and after."""
    lines = ["| split | variant | seed | test AUROC | old figure | new figure [95 % interval] |",
             "|---|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        f = r["new_figure"]
        lines.append(f"| {r['split']} | {r['variant']} | {r['seed']} | {r['auroc']:.3f} | "
                     f"{r['val_synthetic_auroc']:.3f} | {f['auroc']:.3f} "
                     f"[{f['ci95'][0]:.3f}–{f['ci95'][1]:.3f}] |")  # fmt: skip
    lines += ["", "| source | runs | Spearman old figure vs test | Spearman new figure vs test |",
              "|---|---|---|---|"]  # fmt: skip
    for source in dict.fromkeys(r["source"] for r in rows):
        rs = [r for r in rows if r["source"] == source]
        test = [r["auroc"] for r in rs]
        old = spearmanr([r["val_synthetic_auroc"] for r in rs], test).statistic
        new = spearmanr([r["new_figure"]["auroc"] for r in rs], test).statistic
        lines.append(f"| {source} | {len(rs)} | {old:+.2f} | {new:+.2f} |")
    fams = list(rows[0]["new_figure"].get("per_family", {})) if rows else []
    for source in dict.fromkeys(r["source"] for r in rows):
        rs = [r for r in rows if r["source"] == source]
        test = [r["auroc"] for r in rs]
        per = []
        for fam in fams:
            rho = spearmanr([r["new_figure"]["per_family"][fam] for r in rs], test).statistic
            per.append(f"{fam} {rho:+.2f}")
        lines.append(f"\n{source}, Spearman per lesion family vs test: " + ", ".join(per))
    return "\n".join(lines)


def main(argv: list[str] | None = None, emit: Callable[[str], None] = print) -> int:
    """Command-line entry point (``python -m tools.experiments.figure_rank``)."""
    p = argparse.ArgumentParser(prog="python -m tools.experiments.figure_rank", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("bench", nargs="+", type=Path, help="bench.jsonl files of the benchmark")
    p.add_argument("--headct", type=Path, help="HeadCT folder (with split.csv)")
    p.add_argument("--chest", type=Path, help="chest X-ray folder (with index.csv)")
    p.add_argument("--out", type=Path, help="also write the re-scored rows here (JSON lines)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument(
        "--sigmas",
        type=float,
        nargs="*",
        default=[],
        help="HeadCT rows: also score each model with these blurs (test AUROC and both "
        "figures re-computed: more ranked points from the same trainings)",
    )
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = [json.loads(ln) for f in args.bench for ln in f.read_text().splitlines() if ln.strip()]
    rows = [r for r in rows if "val_synthetic_auroc" in r]
    rows = rescore(rows, args)
    if args.out:
        keep = [{k: v for k, v in r.items() if k not in ("test_scores", "test_labels")}
                for r in rows]  # fmt: skip
        args.out.write_text("".join(json.dumps(r) + "\n" for r in keep))
    emit(rank_table(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
