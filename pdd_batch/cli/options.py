"""Options and helpers several commands share (one definition, one help text)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from pdd_batch.evaluation.datasets import DatasetError, ImageItem, describe, list_images
from pdd_batch.runs.config import RunConfigError, parse_teacher_weights

AddressOption = Annotated[
    str | None, typer.Option(help="Ray cluster to run on (else RAY_ADDRESS, else here).")
]
ModelOption = Annotated[
    Path | None,
    typer.Option(help="Checkpoint folder (default: the embedded head-CT model)."),
]
ModelsOption = Annotated[
    list[Path] | None,
    typer.Option(
        "--model",
        help="Checkpoint folder, repeatable (or a folder of checkpoint folders, a model set): "
        "each series goes to the model whose scope matches it; none: skipped. Default: the "
        "embedded set (head CT + chest X-ray).",
    ),
]
SplitFileOption = Annotated[Path | None, typer.Option(help="CSV path,label,split.")]
TeacherWeightsOption = Annotated[
    list[str] | None,
    typer.Option(
        "--teacher-weights",
        help="ROLE=PATH local teacher weights, ROLE cnn or mamba (repeatable); for a trained "
        "checkpoint, where its weight files are now (their sha256 is still checked).",
    ),
]

# Ingest options of `screen` and `inspect` (defaults: RunConfig / ingest.archive_io.IngestLimits).
FollowLinksOption = Annotated[
    bool,
    typer.Option(
        "--follow-links-outside", help="Read links that point outside the archive (refused)."
    ),
]
MaxVoxelsOption = Annotated[
    int, typer.Option(min=1, help="Cap: voxels of one series (over: error row).")
]
MaxFramesOption = Annotated[int, typer.Option(min=1, help="Cap: NumberOfFrames of one file.")]
MaxMemberOption = Annotated[
    int, typer.Option(min=1, help="Cap: bytes of one .zip/.tar member (read whole).")
]
MaxRatioOption = Annotated[
    float, typer.Option(min=1.0, help="Cap: expansion of a zip member, .nii.gz or JPEG image.")
]


def load_items(
    console: Console,
    data: Path,
    split_file: Path | None,
    split: str | None,
    *,
    splits: tuple[str, ...] | None = None,
) -> tuple[list[ImageItem], str]:
    """List DATA's images (exit 2 with a clear message on a bad layout) and describe them;
    ``splits`` keeps several splits instead of ``split``."""
    try:
        items = list_images(data, split_file, split, splits=splits)
    except DatasetError as exc:
        console.print(f"[red]{exc}[/]")
        raise typer.Exit(code=2) from exc
    counts = ", ".join(f"{k} {v}" for k, v in describe(items).items())
    console.print(f"{data.name}: {counts}")
    shown = "/".join(splits) if splits else split
    source = f"{data.name}" + (f" ({split_file.name}, split {shown})" if split_file else "")
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
