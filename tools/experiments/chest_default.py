"""Flagged and out-of-distribution rates of the embedded chest X-ray default on its test split
(docs/results.md and docs/model_card.md, issue 14 items 3 and 4), in-process (no Ray).

For each test image: the score, whether it is above the calibrated threshold, and whether the
checkpoint's in-distribution check (``ood.safetensors``, fitted by ``pdd-batch train``) calls it
out of distribution (then it is reported ``out_of_distribution``, never ``flagged``).

    PYTHONPATH=. .venv/bin/python -m tools.experiments.chest_default \\
        --data ../shared/data/chestxray --split-file docs/data/chest_split.csv \\
        --model model/default_chest_model --out runs/chest_default.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from model.checkpoint import load_checkpoint
from pdd_batch.evaluation.datasets import list_images
from pdd_batch.evaluation.metrics import auroc_ci, image_metrics
from pdd_batch.ingest.preprocess import PreprocessSpec, load_image_file
from pdd_batch.runs.outcome import DEFAULT_MIN_ASSESSED, OUTCOMES, study_rows
from tools.experiments.ood_check import _score


def product_outcomes(
    scores: np.ndarray,
    threshold: float,
    ood: np.ndarray | None,
    min_assessed: float = DEFAULT_MIN_ASSESSED,
) -> list[str]:
    """The study outcome of each image (its own one-slice study), as ``pdd-batch screen`` rolls
    it up: a slice beyond the check is never flagged; ``ood`` None: a model without a check."""
    import pyarrow as pa

    n = len(scores)
    beyond = np.zeros(n, bool) if ood is None else ood
    table = pa.table(
        {
            "study_key": [f"s{i:06d}" for i in range(n)],
            "series_key": [f"s{i:06d}" for i in range(n)],
            "slice_key": [f"s{i:06d}:0:0" for i in range(n)],
            "score": scores.astype(np.float32),
            "flagged": (scores > threshold) & ~beyond,
            "threshold": np.full(n, threshold, np.float32),
            "modality": ["CR"] * n,
            "model_id": ["m"] * n,
            "checkpoint_hash": ["h"] * n,
            "out_of_distribution": (
                pa.nulls(n, pa.bool_()) if ood is None else pa.array(ood.tolist(), pa.bool_())
            ),
        }
    )
    rows = study_rows(table, topk=1, run_id="chest", min_assessed=min_assessed)
    keys, decisions = rows.column("study_key").to_pylist(), rows.column("decision").to_pylist()
    by_key = dict(zip(keys, decisions, strict=True))
    return [by_key[f"s{i:06d}"] for i in range(n)]


def split_rates(model_dir: Path, data: Path, split_file: Path, split: str) -> dict:
    """AUROC (with its bootstrap interval), and per class the flagged counts before and after
    the in-distribution check and the out-of-distribution count, on one split."""
    loaded = load_checkpoint(model_dir)
    spec = PreprocessSpec.from_dict(loaded.preprocessing)
    threshold = float(loaded.calibration["threshold"])
    items = list_images(data, split_file, split)
    x = np.stack([load_image_file(it.path, spec) for it in items])  # (N, S, S)
    labels = np.array([it.label for it in items])
    scores, dists = _score(loaded.model, loaded.ood, x)
    ood = dists > loaded.ood.threshold if loaded.ood is not None else np.zeros(len(x), bool)
    flagged = scores > threshold
    with_check = np.array(product_outcomes(scores, threshold, ood))
    without_check = np.array(product_outcomes(scores, threshold, None))
    out = {"model_id": loaded.model_id, "split": split, "threshold": threshold, "n": len(x)}
    if len(set(labels.tolist())) == 2:
        out["auroc"] = image_metrics(labels, scores)["auroc"]
        out["auroc_ci95"] = auroc_ci(labels, scores)
    for name, lab in (("normal", 0), ("abnormal", 1)):
        sel = labels == lab
        out[name] = {
            "n": int(sel.sum()),
            "flagged_before": int(flagged[sel].sum()),
            "flagged_after": int((flagged & ~ood)[sel].sum()),
            "out_of_distribution": int(ood[sel].sum()),
            "outcome_with_check": {o: int((with_check[sel] == o).sum()) for o in OUTCOMES},
            "outcome_without_check": {o: int((without_check[sel] == o).sum()) for o in OUTCOMES},
        }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--split-file", type=Path, required=True)
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--splits", nargs="+", default=["test", "val"])
    parser.add_argument("--out", type=Path, default=Path("chest_default.json"))
    args = parser.parse_args()
    torch.set_num_threads(2)
    report = [split_rates(args.model, args.data, args.split_file, s) for s in args.splits]
    args.out.write_text(json.dumps(report, indent=1))
    for row in report:
        print(json.dumps(row))


if __name__ == "__main__":
    main()
