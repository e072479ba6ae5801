"""Selection as `pdd-batch train` does it, over HeadCT re-draws and chest subsets (issue 23).

A command of its own (not a test). For every split it runs ``jobs.selection.run_selection`` with
the product's candidates and defaults (framing auto, the margin rule), keeps every candidate, and
only **afterwards** scores each candidate on the split's test images. It records, per candidate:
the figure ``train`` chose by (and the per-copy scores, so other family subsets of the same
copies can be compared without retraining), the test AUROC with its interval, the test scores
(for paired differences), the number of training normals and their heterogeneity (the in-
distribution check's leave-one-out 3-NN distance between training normals). E.g.::

    OMP_NUM_THREADS=2 nice -n 5 python -m tools.experiments.selection_study \
        --headct ../shared/data/headct --draws 4 --chest ../shared/data/chestxray \
        --chest-split docs/data/chest_split.csv --chest-train 50 200 --out runs/sel_study
    python -m tools.experiments.selection_study --out runs/sel_study --table

Splits: ``headct-fixed`` (its ``split.csv``: 60 train / 10 val / 30+100 test) and ``headct-dK``
(the 100 normals re-drawn 60 / 10 / 30 with seed 3000+K, all 100 haemorrhages in test); ``chest-nN``
(the first N training normals of the patient split, by a stable hash of the patient; the split's
151 val normals and its whole test set). Test images are read after selection and never by it.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from pdd_batch.evaluation.datasets import ImageItem, list_images

STUDY_CANDIDATES = ("lite0-d", "lite0", "rd4ad")  # fixed here: the tables re-apply either default
HEADCT_SIZES = (60, 10)  # train, val normals of a re-draw (the fixed split's sizes)
SCOPES = {  # the --scope of the embedded defaults' training commands (docs/results.md)
    "headct": "modality=CT,body_part=HEAD,orientation=axial,fallback=accept",
    "chest": "modality=CR/DX,body_part=CHEST,orientation=PA/AP,age=1-5",
}


def headct_split(data: Path, draw: int | None) -> tuple[list[ImageItem], list[ImageItem]]:
    """(train + val normals, test items) of the fixed split (``draw`` None) or a re-draw."""
    items = list_images(data, data / "split.csv")
    if draw is None:
        return [it for it in items if it.split in ("train", "val")], [
            it for it in items if it.split == "test"
        ]
    normals = sorted((it for it in items if it.label == 0), key=lambda it: str(it.path))
    order = np.random.default_rng(3000 + draw).permutation(len(normals))
    n_train, n_val = HEADCT_SIZES
    split = ["train"] * n_train + ["val"] * n_val + ["test"] * (len(normals) - n_train - n_val)
    drawn = [replace(normals[i], split=s) for i, s in zip(order, split, strict=True)]
    test = [it for it in drawn if it.split == "test"]
    test += [replace(it, split="test") for it in items if it.label == 1]
    return [it for it in drawn if it.split != "test"], test


def _stable(key: str) -> str:
    return hashlib.sha256(f"subset:{key}".encode()).hexdigest()


def chest_split(
    data: Path, split_csv: Path, cap: int | None
) -> tuple[list[ImageItem], list[ImageItem]]:
    """(train normals capped at ``cap`` by a stable patient order + all val normals, test)."""
    items = list_images(data, split_csv)
    train = sorted(
        (it for it in items if it.split == "train" and it.label == 0),
        key=lambda it: (_stable(it.group or it.rel), it.rel),
    )
    val = [it for it in items if it.split == "val" and it.label == 0]
    test = [it for it in items if it.split == "test"]
    return train[:cap] + val, test


def _figure_scores(model: Any, images: np.ndarray) -> dict[str, list]:
    """Per-copy scores of the selection figure's copies (the same seed as ``train``), with each
    copy's lesion family."""
    from jobs.evaluate import synthetic_figure_of
    from jobs.selection import FIGURE_SEED

    return synthetic_figure_of(model, images, FIGURE_SEED)["scores"]


def _heterogeneity(ood: Any) -> float | None:
    """Median over training normals of the mean distance to their 3 nearest other training
    normals in the in-distribution check's standardised teacher features, / sqrt(D)."""
    import torch

    if ood is None:
        return None
    bank = ood.bank.float()  # (N, D)
    d = torch.cdist(bank, bank).fill_diagonal_(float("inf"))  # (N, N)
    loo = d.topk(min(3, len(bank) - 1), dim=1, largest=False).values.mean(dim=1)  # (N,)
    return float(loo.median() / bank.shape[1] ** 0.5)


def _test_bank(test: list[ImageItem], spec: Any) -> tuple[np.ndarray, np.ndarray]:
    """Test images (N, S, S) and labels (N,), loaded once per split for every candidate."""
    from jobs.train import load_images

    images, kept, _ = load_images(test, spec)
    return images, np.array([it.label for it in kept])


def score_candidates(
    sel_dir: Path, record: dict[str, Any], val: list[ImageItem], test: list[ImageItem]
) -> list[dict[str, Any]]:
    """Every kept candidate: its figure record, its per-copy figure scores and its test AUROC."""
    from sklearn.metrics import roc_auc_score

    from jobs.evaluate import load_model, score_arrays
    from jobs.selection import CANDIDATE_DIR, validation_images
    from pdd_batch.evaluation.metrics import auroc_ci
    from pdd_batch.ingest.preprocess import PreprocessSpec

    rows, bank = [], None
    for cand in record["candidates"]:
        loaded = load_model(sel_dir / CANDIDATE_DIR / cand["config"])
        spec = PreprocessSpec.from_dict(loaded.preprocessing)
        if bank is None:  # every candidate has the same input size and framing
            bank = _test_bank(test, spec)
        images, labels = bank
        scores = score_arrays(loaded.model, images)
        val_images = validation_images(val, spec.image_size, spec.framing)
        rows.append({
            **{k: cand[k] for k in ("config", "arch", "map_sigma", "n_train")},
            "figure": cand["figure"],
            "figure_scores": _figure_scores(loaded.model, val_images),
            "kept": cand["config"] == record["chosen"],
            "test_auroc": float(roc_auc_score(labels, scores)),
            "test_ci95": list(auroc_ci(labels, scores)),
            "test_scores": scores.tolist(),
            "test_labels": labels.tolist(),
            "heterogeneity": _heterogeneity(loaded.ood),
        })  # fmt: skip
    return rows


def run_split(name: str, source: str, items: list[ImageItem], test: list[ImageItem],
              args: argparse.Namespace, emit: Callable[[str], None]) -> dict[str, Any]:  # fmt: skip
    """Selection on ``items`` (train + val normals only), then the candidates scored on test."""
    from jobs.selection import candidates, run_selection
    from jobs.train import TrainConfig
    from pdd_batch.ingest.scope import scope_record

    epochs = args.chest_epochs if source == "chest" else args.epochs
    sel_dir = args.out / name
    t0 = time.perf_counter()
    cands = candidates(STUDY_CANDIDATES, image_size=args.image_size)
    sel = run_selection(items, sel_dir, cands, TrainConfig(epochs=epochs, seed=args.seed),
                        scope=scope_record(SCOPES[source]), data_description=name,
                        keep_candidates=True)  # fmt: skip
    train_s = time.perf_counter() - t0
    val = [it for it in items if it.split == "val"]
    rows = score_candidates(sel_dir, sel.record, val, test)
    emit(f"{name}: kept {sel.chosen}; " + ", ".join(
        f"{r['config']} figure {r['figure']['auroc']:.3f} test {r['test_auroc']:.3f}" for r in rows
    ) + f" ({train_s:.0f} s selection)")  # fmt: skip
    return {"split": name, "source": source, "seed": args.seed, "epochs": epochs,
            "n_train": rows[0]["n_train"], "n_val": len(val), "chosen": sel.chosen,
            "versus_default": sel.record.get("versus_default"), "candidates": rows,
            "selection_s": round(train_s, 1)}  # fmt: skip


def _splits(args: argparse.Namespace) -> list[tuple[str, str, Any]]:
    """(name, source, loader) of every split the arguments name."""
    out: list[tuple[str, str, Any]] = []
    if args.headct:
        out.append(("headct-fixed", "headct", lambda: headct_split(args.headct, None)))
        for k in range(args.draws):
            out.append((f"headct-d{k}", "headct", lambda k=k: headct_split(args.headct, k)))
    if args.chest:
        for cap in args.chest_train:
            load = lambda cap=cap: chest_split(args.chest, args.chest_split, cap)  # noqa: E731
            out.append((f"chest-n{cap}", "chest", load))
    return out


def run_study(args: argparse.Namespace, emit: Callable[[str], None] = print) -> None:
    """Every split not yet in ``OUT/study.jsonl``, appended to it as it finishes."""
    args.out.mkdir(parents=True, exist_ok=True)
    done = {(r["split"], r["seed"]) for r in read_rows(args.out)}
    for name, source, load in _splits(args):
        if (name, args.seed) in done:
            emit(f"{name}: already in study.jsonl")
            continue
        items, test = load()
        row = run_split(name, source, items, test, args, emit)
        with (args.out / "study.jsonl").open("a") as fh:
            fh.write(json.dumps(row) + "\n")


def read_rows(out: Path) -> list[dict[str, Any]]:
    path = Path(out) / "study.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def main(argv: list[str] | None = None, emit: Callable[[str], None] = print) -> int:
    p = argparse.ArgumentParser(prog="python -m tools.experiments.selection_study",
                                description=__doc__.split("\n\n")[0])  # fmt: skip
    p.add_argument("--headct", type=Path)
    p.add_argument("--draws", type=int, default=4, help="HeadCT re-draws beside the fixed split")
    p.add_argument("--chest", type=Path)
    p.add_argument("--chest-split", type=Path, default=Path("docs/data/chest_split.csv"))
    p.add_argument("--chest-train", type=int, nargs="*", default=[50, 200])
    p.add_argument("--epochs", type=int, default=100)
    p.add_argument("--chest-epochs", type=int, default=40)
    p.add_argument("--image-size", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--table", action="store_true", help="only print the tables of OUT")
    args = p.parse_args(argv)
    if args.table:
        from tools.experiments.selection_tables import render

        emit(render(read_rows(args.out)))
        return 0
    run_study(args, emit)
    return 0


if __name__ == "__main__":
    sys.exit(main())
