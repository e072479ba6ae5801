"""`pdd-batch evaluate DATA --out DIR`: metrics, trivial floors and a figure for a checkpoint."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from pdd_batch.cli.options import (
    AddressOption,
    ModelOption,
    SplitFileOption,
    TeacherWeightsOption,
    load_items,
    teacher_weight_paths,
)


def evaluate_command(
    data: Annotated[
        Path,
        typer.Argument(
            help="Labelled image folder or split CSV (--synthetic: normals; --archive: studies)."
        ),
    ],
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for metrics.json and PNG.")],
    split_file: SplitFileOption = None,
    split: Annotated[
        str | None, typer.Option(help="Split to evaluate (default: test with a split file).")
    ] = None,
    model: ModelOption = None,
    address: AddressOption = None,
    teacher_weights: TeacherWeightsOption = None,
    synthetic: Annotated[
        bool,
        typer.Option(
            "--synthetic",
            help="Normals only: AUROC of the normal images against seeded synthetic-lesion "
            "copies of them (five lesion families), with a bootstrap interval. Compares models "
            "without labelled anomalies; not a test AUROC.",
        ),
    ] = False,
    archive: Annotated[
        bool,
        typer.Option(help="With --synthetic: DATA is an archive of normal DICOM/NIfTI studies."),
    ] = False,
) -> None:
    """Image AUROC, AP and F1-max (pixel AUROC/AUPRO with masks) beside trivial floors; with
    --synthetic, the synthetic-lesion figure on normals only."""
    from rich.progress import Progress

    from jobs.evaluate import EvaluationError, run_evaluation
    from model.checkpoint import CheckpointError
    from model.teachers import TeacherWeightsError

    console = Console()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if synthetic or archive:
        _synthetic(console, data, out, split_file, split, model, address, teacher_weights,
                   archive=archive)  # fmt: skip
        return
    if split is None and (split_file is not None or Path(data).suffix.lower() == ".csv"):
        split = "test"
    moved = teacher_weight_paths(console, teacher_weights)
    items, desc = load_items(console, data, split_file, split)
    with Progress(console=console, transient=True) as bar:
        task = bar.add_task("scoring", total=len(items))
        try:
            m = run_evaluation(
                items, out, model,
                progress=lambda done, total: bar.update(task, completed=done, total=total),
                address=address, data_description=desc, teacher_weights=moved,
            )  # fmt: skip
        except (EvaluationError, CheckpointError, TeacherWeightsError, FileNotFoundError) as exc:
            console.print(f"[red]evaluation failed: {exc}[/]")
            raise typer.Exit(code=1) from exc
    table = Table(title=f"{m['model_id']} on {desc}: {m['n_normal']} normal, "
                        f"{m['n_anomalous']} anomalous")  # fmt: skip
    for col in ("metric", "model", "floor: mean intensity", "floor: image size"):
        table.add_column(col, justify="right" if col != "metric" else "left")
    fl = m["floors"]
    lo, hi = m["auroc_ci95"]
    table.add_row("AUROC", f"{m['auroc']:.3f}", f"{fl['mean_intensity_auroc']:.3f}",
                  f"{fl['image_size_auroc']:.3f}")  # fmt: skip
    table.add_row("AUROC 95% CI", f"{lo:.3f}–{hi:.3f}", "", "")
    table.add_row("AP", f"{m['ap']:.3f}", "", "")
    table.add_row("F1-max", f"{m['f1_max']:.3f}", "", "")
    for key, name in (("pixel_auroc", "pixel AUROC"), ("aupro", "AUPRO (FPR<=0.3)")):
        if key in m:
            table.add_row(name, f"{m[key]:.3f}", "", "")
    console.print(table)
    if "at_threshold" in m:
        t = m["at_threshold"]
        console.print(f"at the calibrated threshold {t['threshold']:.4g}: "
                      f"FPR {t['fpr']:.3f}, TPR {t['tpr']:.3f}")  # fmt: skip
    for err in m["errors"]:
        console.print(f"[yellow]skipped {err['file']}: {err['reason']}[/]")
    console.print("floors are AUROCs of trivial scores in their better direction")
    console.print(f"wrote {Path(out) / 'metrics.json'} and {Path(out) / 'evaluation.png'}")


def _synthetic(
    console: Console,
    data: Path,
    out: Path,
    split_file: Path | None,
    split: str | None,
    model: Path | None,
    address: str | None,
    teacher_weights: list[str] | None,
    *,
    archive: bool,
) -> None:
    """``evaluate --synthetic``: the figure of one checkpoint on normals (a split file's ``val``
    rows by default, the normal class folders, or an archive of normal studies)."""
    from jobs.evaluate import EvaluationError, run_synthetic_evaluation
    from model.checkpoint import CheckpointError
    from model.teachers import TeacherWeightsError

    moved = teacher_weight_paths(console, teacher_weights)
    if archive:
        if not data.is_dir():
            console.print(f"[red]archive not found: {data}[/]")
            raise typer.Exit(code=2)
        items: list | Path = data
        desc = f"archive {data.name} (all slices)"
    else:
        if split is None and (split_file is not None or data.suffix.lower() == ".csv"):
            split = "val"
        items, desc = load_items(console, data, split_file, split)
    try:
        f = run_synthetic_evaluation(items, out, model, address=address, data_description=desc,
                                     teacher_weights=moved)  # fmt: skip
    except (EvaluationError, CheckpointError, TeacherWeightsError, FileNotFoundError) as exc:
        console.print(f"[red]evaluation failed: {exc}[/]")
        raise typer.Exit(code=1) from exc
    table = Table(title=f"{f['model_id']} on {desc}: {f['n_normal']} normals, "
                        f"{f['n_lesioned']} lesioned copies")  # fmt: skip
    table.add_column("figure")
    table.add_column("AUROC", justify="right")
    lo, hi = f["ci95"]
    table.add_row("synthetic lesions, all families", f"{f['auroc']:.3f}")
    table.add_row("95% interval (resampling normals)", f"{lo:.3f}–{hi:.3f}")
    for name, value in f.get("per_family", {}).items():
        table.add_row(f"  {name}", f"{value:.3f}")
    console.print(table)
    for err in f["errors"]:
        console.print(f"[yellow]skipped an unreadable input ({err['stage']}): {err['reason']}[/]")
    console.print("a ranking figure for comparing models on the same normals, not a test AUROC")
    console.print(f"wrote {Path(out) / 'synthetic.json'}")
