"""Selection inside ``pdd-batch train``: every candidate trained, the best kept by a figure that
needs no labelled anomaly.

The rule (docs/results.md, "Selection inside train"):

1. Validation normals are held out **by patient or study, never by slice**: the split file's
   ``val`` normals when it has any; else, when every normal has a ``patient_id``, 20 % of the
   patients; else 20 % of the files (an image folder: one file = one slice of its own); for an
   archive, 20 % of the studies. ``test`` rows are never read.
2. Every candidate (``CANDIDATES``: PDD ``lite0`` as PDD_SPEC defines it (targets not detached,
   σ 4 px; the default), PDD ``lite0-d`` (targets detached, σ 2 px), RD4AD ``rd4ad``)
   trains on the remaining normals with the same run settings.
3. Its figure is the synthetic-lesion AUROC of the validation normals against their seeded
   lesioned copies (``pdd_batch.evaluation.synthetic``: five lesion families), with a bootstrap
   interval over the validation images.
4. The highest figure wins (ties: the earlier candidate, i.e. the default). The winner's
   checkpoint is the output; ``config.json`` → ``training.selection`` and ``model_card.md`` list
   every candidate's figure and why the winner won.

With fewer than ``MIN_NORMALS`` normals or ``MIN_GROUPS`` patients/studies/files there is nothing
to hold out: the default candidate is trained on all of them and the record says why.
Candidates run in this process, or as parallel Ray actors on a cluster (``address``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from jobs.train import (
    ArchivePart,
    TrainConfig,
    TrainError,
    TrainProgress,
    TrainResult,
    archive_images,
    load_images,
    ray_address,
    train_model,
)
from model.config import ModelConfig, get_config
from pdd_batch.evaluation.datasets import ImageItem
from pdd_batch.ingest.framing import AUTO
from pdd_batch.ingest.preprocess import PreprocessSpec

log = logging.getLogger(__name__)

# The first is the default: PDD as PDD_SPEC defines it (targets not detached, σ 4 px), kept unless
# the site's normals speak against it (docs/results.md, "Selection inside train").
CANDIDATES = ("lite0", "lite0-d", "rd4ad")
DEFAULT_CANDIDATE = CANDIDATES[0]
MIN_NORMALS = 10  # fewer normal images: nothing to hold out, the default is trained
MIN_GROUPS = 3  # fewer patients / studies / files: likewise
VAL_FRACTION = 0.2
FIGURE_SEED = 0
CANDIDATE_DIR = "candidates"

Data = Sequence[ImageItem] | Path | ArchivePart
SelectionProgress = Callable[[str, TrainProgress], None]  # (candidate name, its progress)


@dataclass(frozen=True)
class Holdout:
    """Training and validation normals of a selection, and how they were separated."""

    train: list[ImageItem] | ArchivePart
    val: list[ImageItem] | ArchivePart
    how: str
    n_groups: int


@dataclass(frozen=True)
class Candidate:
    """One configuration to try: a label (its folder and name in the record), the model config
    and, when it differs from the selection's, its own run settings."""

    label: str
    config: ModelConfig
    run: TrainConfig | None = None


@dataclass
class SelectionResult:
    """The kept checkpoint and the record stored in it."""

    result: TrainResult
    chosen: str
    record: dict[str, Any] = field(default_factory=dict)


def _unit(key: str, seed: int) -> float:
    digest = hashlib.sha256(f"select:{seed}:{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def _pick_groups(groups: Sequence[str], seed: int) -> set[str]:
    """``VAL_FRACTION`` of the groups (at least 1), chosen by a stable hash."""
    ordered = sorted(set(groups), key=lambda g: _unit(g, seed))
    return set(ordered[: max(1, round(VAL_FRACTION * len(ordered)))])


def holdout_items(items: Sequence[ImageItem], seed: int = 0) -> Holdout | str:
    """Validation normals of an image list (rule 1), or the reason there are too few."""
    train = [it for it in items if it.label == 0 and it.split in (None, "train")]
    val = [it for it in items if it.label == 0 and it.split == "val"]
    if val:
        groups = {it.group or it.rel for it in train + val}
        if len(train) < 2:
            return f"only {len(train)} training normal(s) beside the split file's val rows"
        return Holdout(train, val, "the split file's val rows", len(groups))
    by_patient = bool(train) and all(it.group for it in train)
    keys = [(it.group if by_patient else it.rel) or it.rel for it in train]
    n_groups = len(set(keys))
    unit = "patients" if by_patient else "files"
    if len(train) < MIN_NORMALS or n_groups < MIN_GROUPS:
        return (
            f"{len(train)} normal images from {n_groups} {unit}: selection needs at least "
            f"{MIN_NORMALS} normals from {MIN_GROUPS} {unit} to hold any out"
        )
    held = _pick_groups(keys, seed)
    return Holdout(
        [it for it, k in zip(train, keys, strict=True) if k not in held],
        [it for it, k in zip(train, keys, strict=True) if k in held],
        f"{len(held)} of {n_groups} {unit} held out ({'by patient' if by_patient else 'by file'})",
        n_groups,
    )


def holdout_archive(root: Path, seed: int = 0) -> Holdout | str:
    """Validation studies of an archive of normal studies (rule 1), or why there are too few."""
    from pdd_batch.ingest.discovery import discover

    studies = sorted({ref.study_key for ref in discover(Path(root)).series})
    if len(studies) < MIN_GROUPS:
        return (
            f"{len(studies)} studies: selection needs at least {MIN_GROUPS} studies to hold any out"
        )
    held = _pick_groups(studies, seed)
    rest = frozenset(studies) - held
    return Holdout(
        ArchivePart(Path(root), rest),
        ArchivePart(Path(root), frozenset(held)),
        f"{len(held)} of {len(studies)} studies held out (by study)",
        len(studies),
    )


def validation_images(
    val: list[ImageItem] | ArchivePart, image_size: int, framing: str | None = None
) -> np.ndarray:
    """The validation normals (N, S, S) at the candidate's input size and framing (the
    checkpoint's ``preprocessing.framing``), unreadable ones skipped."""
    spec = PreprocessSpec(image_size=image_size, framing=framing)
    if isinstance(val, ArchivePart):
        images, _, _ = archive_images(val.root, spec, TrainConfig(), val.studies)
    else:
        images, _, _ = load_images(val, spec)
    return images


def train_candidate(
    train: Data,
    val: list[ImageItem] | ArchivePart,
    out_dir: Path,
    cfg: ModelConfig,
    run: TrainConfig,
    *,
    progress: Callable[[TrainProgress], None] | None = None,
    data_description: str = "",
    scope: dict[str, Any] | None = None,
    feature_cache: dict[Any, Any] | None = None,
    resume: bool = False,
    framing: str | None = AUTO,
) -> tuple[TrainResult, dict[str, Any]]:
    """Train one candidate and compute its figure on the validation normals (rule 2–3)."""
    from jobs.evaluate import EvaluationError, synthetic_figure_of

    res = train_model(
        train,
        out_dir,
        cfg,
        run,
        progress=progress,
        scope=scope,
        data_description=data_description,
        resume=resume,
        feature_cache=feature_cache,
        framing=framing,
    )
    meta = json.loads((Path(res.checkpoint) / "config.json").read_text(encoding="utf-8"))
    images = validation_images(val, cfg.image_size, meta["preprocessing"].get("framing"))
    try:
        figure = synthetic_figure_of(res.model, images, FIGURE_SEED)
    except EvaluationError as exc:
        raise TrainError(f"candidate {cfg.name}: {exc}") from exc
    return replace(res, model=None), figure


def candidates(names: Sequence[str] = CANDIDATES, **overrides: Any) -> list[Candidate]:
    """The named configs as candidates (``overrides``, e.g. ``image_size``, apply to each).

    Raises:
        model.config.ConfigError: an unknown name or override.
    """
    return [Candidate(name, get_config(name, **overrides)) for name in names]


def _train_all(
    holdout: Holdout,
    out_dir: Path,
    cands: Sequence[Candidate],
    run: TrainConfig,
    *,
    address: str | None,
    progress: SelectionProgress | None,
    data_description: str,
    scope: dict[str, Any] | None,
    resume: bool = False,
    framing: str | None = AUTO,
) -> list[tuple[TrainResult, dict[str, Any]]]:
    """Every candidate trained and scored: in this process one after the other (sharing teacher
    features), or as parallel Ray actors when a cluster address is given."""
    root = Path(out_dir) / CANDIDATE_DIR
    kwargs = {
        "data_description": data_description,
        "scope": scope,
        "resume": resume,
        "framing": framing,
    }
    addr = ray_address(address)
    if addr is None:
        cache: dict[Any, Any] = {}
        out = []
        for c in cands:
            report = None if progress is None else (lambda p, n=c.label: progress(n, p))
            out.append(
                train_candidate(
                    holdout.train,
                    holdout.val,
                    root / c.label,
                    c.config,
                    c.run or run,
                    progress=report,
                    feature_cache=cache,
                    **kwargs,
                )
            )
        return out
    from jobs.train import run_remote_many

    calls = [
        (
            train_candidate,
            (holdout.train, holdout.val, root / c.label, c.config, c.run or run),
            kwargs,
        )
        for c in cands
    ]
    names = [c.label for c in cands]
    report_many = None if progress is None else (lambda i, p: progress(names[i], p))
    return run_remote_many(calls, address=addr, progress=report_many)


def _margin(figures: list[dict[str, Any]], best: int) -> dict[str, Any] | None:
    """The best candidate's figure minus the default's (candidate 0), paired on the same copies
    (``synthetic.paired_difference``); None when the best is the default or the copies differ
    (candidates of different input sizes)."""
    from pdd_batch.evaluation.synthetic import paired_difference

    a, b = figures[best]["scores"], figures[0]["scores"]
    if best == 0 or a["source"] != b["source"] or len(a["normal"]) != len(b["normal"]):
        return None
    d, lo, hi = paired_difference((a["normal"], a["lesion"]), (b["normal"], b["lesion"]),
                                  a["source"], seed=FIGURE_SEED)  # fmt: skip
    return {"difference": d, "ci95": [lo, hi]}


def choose(figures: Sequence[dict[str, Any]]) -> tuple[int, int, dict[str, Any] | None]:
    """Rule 4 on the candidates' figures (``synthetic_figure_of`` dicts, the default first):
    (index of the highest figure, index kept, paired margin of the highest over the default).
    The highest replaces the default only when the margin's 95 % interval is above 0."""
    best = max(range(len(figures)), key=lambda i: (figures[i]["auroc"], -i))
    margin = _margin(list(figures), best)
    keep = 0 if margin is not None and margin["ci95"][0] <= 0 else best
    return best, keep, margin


def _why(rows: list[dict[str, Any]], best: int, chosen: int, margin: dict[str, Any] | None) -> str:
    """The choice in words: the best figure against the others and, when the best is not the
    default, its paired difference to the default."""
    top, default = rows[best], rows[0]
    lo, hi = top["figure"]["ci95"]
    text = (f"{top['config']} has the highest synthetic-lesion AUROC on the held-out validation "
            f"normals: {top['figure']['auroc']:.3f} [{lo:.3f}–{hi:.3f}]")  # fmt: skip
    others = [f"{r['config']} {r['figure']['auroc']:.3f}" for r in rows if r is not top]
    if others:
        text += f", against {', '.join(others)}"
    if margin is not None:
        d, (mlo, mhi) = margin["difference"], margin["ci95"]
        name = default["config"]
        paired = f"paired difference to the default {name} {d:+.3f} [{mlo:+.3f}, {mhi:+.3f}]"
        if chosen == 0:
            return (
                f"{text}; but its {paired} does not exclude 0, so the default {name} is "
                "kept (the normals do not speak against it)"
            )
        text += f"; {paired}, above 0"
    if rows[chosen]["arch"] == "rd4ad":
        text += (
            ". The kept model is RD4AD (one student), not PDD: on these normals PDD scored lower"
        )
    return text


def _record(holdout: Holdout, rows: list[dict[str, Any]], best: int, chosen: int,
            margin: dict[str, Any] | None) -> dict[str, Any]:  # fmt: skip
    return {
        "rule": "highest synthetic-lesion AUROC (pdd_batch.evaluation.synthetic, seed "
        f"{FIGURE_SEED}) on validation normals held out by patient/study; a candidate other than "
        "the default (the first) replaces it only when its paired bootstrap difference to the "
        "default's figure is above 0 (95 % interval); ties keep the earlier candidate",
        "holdout": holdout.how,
        "n_validation_groups": holdout.n_groups,
        "candidates": rows,
        "best_figure": rows[best]["config"],
        "versus_default": margin,
        "chosen": rows[chosen]["config"],
        "why": _why(rows, best, chosen, margin),
    }


def model_card_text(record: dict[str, Any]) -> str:
    """``model_card.md`` of a selected checkpoint: the candidates' figures and the choice."""
    lines = ["# Model card (written by `pdd-batch train`)", ""]
    if "skipped" in record:
        lines += [
            f"Configuration: `{record['chosen']}` (the documented default).",
            "",
            f"No selection: {record['skipped']}.",
        ]
        return "\n".join(lines) + "\n"
    lines += [
        f"Configuration chosen: **`{record['chosen']}`**. {record['why']}.",
        "",
        f"Rule: {record['rule']}. Validation normals: {record['holdout']}.",
        "",
        "| candidate | model | synthetic-lesion AUROC [95 % interval] | per lesion family |",
        "|---|---|---|---|",
    ]
    for r in record["candidates"]:
        f = r["figure"]
        fam = ", ".join(f"{k} {v:.3f}" for k, v in f.get("per_family", {}).items())
        lo, hi = f["ci95"]
        lines.append(
            f"| `{r['config']}` | {r['arch'].upper()}, σ {r['map_sigma']:g} px | "
            f"{f['auroc']:.3f} [{lo:.3f}–{hi:.3f}] | {fam} |"
        )
    lines += [
        "",
        "The figure ranks candidates on synthetic lesions; it is not a test AUROC. "
        "Calibrate on your own normals (`pdd-batch calibrate`) before use.",
    ]
    return "\n".join(lines) + "\n"


def _keep(winner_dir: Path, out_dir: Path) -> None:
    """Copy the winner's checkpoint files into ``out_dir`` (the resume state stays behind)."""
    for f in winner_dir.iterdir():
        if f.is_file() and f.name != "resume.pt":
            shutil.copy2(f, out_dir / f.name)


def run_selection(
    data: Data,
    out_dir: Path,
    cands: Sequence[Candidate],
    run: TrainConfig | None = None,
    *,
    address: str | None = None,
    progress: SelectionProgress | None = None,
    data_description: str = "",
    scope: dict[str, Any] | None = None,
    resume: bool = False,
    framing: str | None = AUTO,
    keep_candidates: bool = False,
) -> SelectionResult:
    """Train every candidate, keep the one with the best figure in ``out_dir`` (the first
    candidate is the default when there are too few normals to hold any out).

    ``keep_candidates``: leave every candidate's checkpoint in ``out_dir/candidates/NAME`` (to
    evaluate or calibrate the others later); by default only the winner is kept.

    Raises:
        TrainError: no candidate, no usable training image, or a candidate failed.
    """
    if not cands:
        raise TrainError("selection needs at least one candidate configuration")
    run = run or TrainConfig()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if isinstance(data, (Path, str, ArchivePart)):
        root = data.root if isinstance(data, ArchivePart) else Path(data)
        holdout = holdout_archive(root, run.seed)
    else:
        holdout = holdout_items(data, run.seed)
    if isinstance(holdout, str):
        return _train_default(
            data,
            out_dir,
            cands[0],
            run,
            holdout,
            address=address,
            progress=progress,
            data_description=data_description,
            scope=scope,
            resume=resume,
            framing=framing,
        )
    results = _train_all(
        holdout,
        out_dir,
        cands,
        run,
        address=address,
        progress=progress,
        data_description=data_description,
        scope=scope,
        resume=resume,
        framing=framing,
    )
    rows = [
        {
            "config": c.label,
            "arch": c.config.arch,
            "map_sigma": float(c.config.map_sigma),
            "figure": fig,
            "n_train": res.n_images,
            "final_loss": res.epoch_losses[-1],
            "epochs": res.epochs_run,
            "wall_s": round(res.wall_s, 1),
        }
        for c, (res, fig) in zip(cands, results, strict=True)
    ]
    best, keep, margin = choose([fig for _, fig in results])
    for row in rows:
        row["figure"].pop("scores", None)  # per-image scores: compared above, not recorded
    chosen = cands[keep].label
    _keep(out_dir / CANDIDATE_DIR / chosen, out_dir)
    if not keep_candidates:
        shutil.rmtree(out_dir / CANDIDATE_DIR, ignore_errors=True)
    record = _record(holdout, rows, best, keep, margin)
    return _finish(out_dir, results[keep][0], chosen, record)


def _finish(
    out_dir: Path, res: TrainResult, chosen: str, record: dict[str, Any]
) -> SelectionResult:
    from model.checkpoint import set_selection

    set_selection(out_dir, record)
    (out_dir / "model_card.md").write_text(model_card_text(record), encoding="utf-8")
    return SelectionResult(replace(res, checkpoint=out_dir, model=None), chosen, record)


def _train_default(
    data: Data,
    out_dir: Path,
    cand: Candidate,
    run: TrainConfig,
    reason: str,
    *,
    address: str | None,
    progress: SelectionProgress | None,
    data_description: str,
    scope: dict[str, Any] | None,
    resume: bool = False,
    framing: str | None = AUTO,
) -> SelectionResult:
    """Too few normals to hold any out: the default candidate on all of them."""
    from jobs.train import run_training

    log.warning("no selection: %s; training the default %s", reason, cand.label)
    report = None if progress is None else (lambda p: progress(cand.label, p))
    items = data.root if isinstance(data, ArchivePart) else data
    res = run_training(
        items,
        out_dir,
        cand.config,
        cand.run or run,
        progress=report,
        address=address,
        data_description=data_description,
        scope=scope,
        resume=resume,
        framing=framing,
    )
    why = f"too few normals to hold any out ({reason}); the default {cand.label}"
    record = {"skipped": reason, "chosen": cand.label, "why": why}
    return _finish(out_dir, res, cand.label, record)
