"""`pdd-batch calibrate DATA --model DIR --fpr 0.05`: threshold from normal images only."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from pdd_batch.cli.options import (
    AddressOption,
    SplitFileOption,
    TeacherWeightsOption,
    load_items,
    teacher_weight_paths,
)


def calibrate_command(
    data: Annotated[Path, typer.Argument(help="Image folder or split CSV with normal images.")],
    model: Annotated[Path, typer.Option(help="Checkpoint folder to calibrate (rewritten).")],
    fpr: Annotated[float, typer.Option(help="Target false-positive rate on normals.")] = 0.05,
    split_file: SplitFileOption = None,
    split: Annotated[
        str | None, typer.Option(help="Split to use (default: val with a split file).")
    ] = None,
    address: AddressOption = None,
    teacher_weights: TeacherWeightsOption = None,
) -> None:
    """Store the threshold that flags at most FPR of DATA's normal images (score > threshold)."""
    from rich.progress import Progress

    from jobs.evaluate import EvaluationError, run_calibration
    from model.checkpoint import CheckpointError
    from model.teachers import TeacherWeightsError
    from pdd_batch.evaluation.calibration import CalibrationError

    console = Console()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if split is None and (split_file is not None or Path(data).suffix.lower() == ".csv"):
        split = "val"
    moved = teacher_weight_paths(console, teacher_weights)
    items, desc = load_items(console, data, split_file, split)
    with Progress(console=console, transient=True) as bar:
        task = bar.add_task("scoring normals", total=sum(it.label == 0 for it in items))
        try:
            rec = run_calibration(
                items, model, fpr, split=split or "all",
                progress=lambda done, total: bar.update(task, completed=done, total=total),
                address=address, data_description=desc, teacher_weights=moved,
            )  # fmt: skip
        except (EvaluationError, CalibrationError, CheckpointError, TeacherWeightsError) as exc:
            console.print(f"[red]calibration failed: {exc}[/]")
            raise typer.Exit(code=1) from exc
    console.print(
        f"threshold {rec['threshold']:.6g} at target FPR {rec['fpr']} from {rec['n_normals']} "
        f"normal images (observed FPR {rec['observed_fpr']:.3f}); flag rule: {rec['rule']}"
    )
    if rec["n_normals"] < 20:
        note = "the threshold is at or near the largest normal score; more normals steady it"
        console.print(f"[yellow]only {rec['n_normals']} normals: {note}[/]")
    console.print(f"stored in {Path(model) / 'config.json'}")
