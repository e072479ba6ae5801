"""`pdd-batch train DATA --out DIR`: train a model on normal images (rich progress bar)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from pdd_batch.config import RunConfigError, parse_teacher_weights
from pdd_batch.datasets import DatasetError, ImageItem, describe, list_images

TeacherWeightsOption = Annotated[
    list[str] | None,
    typer.Option(
        "--teacher-weights",
        help="ROLE=PATH local teacher weights, ROLE cnn or mamba (repeatable); for a trained "
        "checkpoint, where its weight files are now (their sha256 is still checked).",
    ),
]


def load_items(
    console: Console, data: Path, split_file: Path | None, split: str | None
) -> tuple[list[ImageItem], str]:
    """List DATA's images (exit 2 with a clear message on a bad layout) and describe them."""
    try:
        items = list_images(data, split_file, split)
    except DatasetError as exc:
        console.print(f"[red]{exc}[/]")
        raise typer.Exit(code=2) from exc
    counts = ", ".join(f"{k} {v}" for k, v in describe(items).items())
    console.print(f"{data.name}: {counts}")
    source = f"{data.name}" + (f" ({split_file.name}, split {split})" if split_file else "")
    return items, source


def teacher_weight_paths(console: Console, pairs: list[str] | None) -> dict[str, str]:
    """``--teacher-weights`` pairs → ``{role: absolute path}``; exit 2 on a malformed pair."""
    try:
        return parse_teacher_weights(pairs or [])
    except RunConfigError as exc:
        console.print(f"[red]{exc}[/]")
        raise typer.Exit(code=2) from exc


def teacher_overrides(console: Console, pairs: list[str] | None) -> dict[str, str]:
    """``--teacher-weights`` pairs → get_config overrides (``cnn_source="file"``, ...)."""
    overrides: dict[str, str] = {}
    for role, path in teacher_weight_paths(console, pairs).items():
        overrides[f"{role}_source"] = "file"
        overrides[f"{role}_weights"] = path
    return overrides


def train_command(
    data: Annotated[Path, typer.Argument(help="Image folder (class sub-folders) or split CSV.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Checkpoint folder to write.")],
    split_file: Annotated[
        Path | None, typer.Option(help="CSV path,label,split (paths relative to DATA or above).")
    ] = None,
    config: Annotated[
        str, typer.Option(help="Model config (lite0, rd4ad, astra, paper, test).")
    ] = "lite0",
    teacher_weights: TeacherWeightsOption = None,
    epochs: Annotated[int, typer.Option(min=1)] = 100,
    image_size: Annotated[int | None, typer.Option(help="Input side S (multiple of 32).")] = None,
    map_sigma: Annotated[
        float | None,
        typer.Option(help="Anomaly-map blur in pixels (lesion-scale dependent; default: config)."),
    ] = None,
    batch_size: Annotated[int, typer.Option(min=1)] = 16,
    seed: Annotated[int, typer.Option(help="Seeds head init and shuffling.")] = 0,
    max_images: Annotated[int | None, typer.Option(min=1, help="Cap on training images.")] = None,
    augment_views: Annotated[
        int,
        typer.Option(
            min=0, help="K seeded views per image (flip/rotate/shift/scale; 0: no augmentation)."
        ),
    ] = 0,
    resume: Annotated[bool, typer.Option(help="Continue from OUT/resume.pt.")] = False,
    archive: Annotated[
        bool, typer.Option(help="DATA is an archive of normal DICOM/NIfTI studies (all slices).")
    ] = False,
    address: Annotated[
        str | None, typer.Option(help="Ray cluster to run on (else RAY_ADDRESS, else here).")
    ] = None,
) -> None:
    """Train on the normal images of DATA (the `train` split when a split file is given).

    With --archive, DATA is a folder of normal studies read exactly as `screen` reads them.
    """
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from jobs.train import TrainConfig, TrainError, run_training
    from model.config import ConfigError, get_config
    from model.teachers import TeacherWeightsError

    console = Console()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if archive:
        if not data.exists():
            console.print(f"[red]archive not found: {data}[/]")
            raise typer.Exit(code=2)
        items, desc = data, f"archive {data.name} (all slices)"
    else:
        items, desc = load_items(console, data, split_file, "train" if split_file else None)
    overrides = teacher_overrides(console, teacher_weights)
    if image_size is not None:
        overrides["image_size"] = image_size
    if map_sigma is not None:
        overrides["map_sigma"] = map_sigma
    try:
        cfg = get_config(config, **overrides)
        run = TrainConfig(
            epochs=epochs,
            batch_size=batch_size,
            seed=seed,
            max_images=max_images,
            augment_views=augment_views,
        )
    except (ConfigError, TrainError) as exc:
        console.print(f"[red]{exc}[/]")
        raise typer.Exit(code=2) from exc
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("epoch {task.fields[epoch]}/{task.fields[epochs]}  loss {task.fields[loss]}"),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=console) as bar:
        task = bar.add_task("teacher features", total=epochs, epoch=0, epochs=epochs, loss="-")

        def report(p) -> None:  # p: jobs.train.TrainProgress
            if p.phase == "features":
                return
            done = p.epoch - 1 + (p.step / p.steps_per_epoch if p.step else 1.0)
            bar.update(task, description="training", completed=done, epoch=p.epoch,
                       loss=f"{p.loss:.4f}")  # fmt: skip

        try:
            result = run_training(items, out, cfg, run, resume=resume, progress=report,
                                  address=address, data_description=desc)  # fmt: skip
        except (TrainError, TeacherWeightsError, ConfigError) as exc:
            console.print(f"[red]training failed: {exc}[/]")
            raise typer.Exit(code=1) from exc
    for err in result.errors:
        console.print(f"[yellow]skipped {err['file']}: {err['reason']}[/]")
    console.print(
        f"trained {cfg.name} ({cfg.arch}, {cfg.image_size} px) on {result.n_images} images, "
        f"{len(result.errors)} skipped, "
        f"{result.epochs_run} epochs, final loss {result.epoch_losses[-1]:.4f}, "
        f"{result.wall_s:.0f} s -> {result.checkpoint}"
    )
