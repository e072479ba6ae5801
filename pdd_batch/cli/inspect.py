"""`pdd-batch inspect ARCHIVE`: what an archive holds, from headers only (no pixel decoding)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console
from rich.table import Table

from pdd_batch.cli.options import (
    FollowLinksOption,
    MaxFramesOption,
    MaxMemberOption,
    MaxRatioOption,
    MaxVoxelsOption,
)
from pdd_batch.ingest.keys import short_key
from pdd_batch.runs.config import RunConfig

if TYPE_CHECKING:
    from pdd_batch.ingest.discovery import Discovery

MAX_ERRORS_SHOWN = 25
MIN_WIDTH = 160
SHORT_SYNTAX = {
    "Explicit VR Little Endian": "Expl LE",
    "Implicit VR Little Endian": "Impl LE",
    "Explicit VR Big Endian": "Expl BE",
    "Deflated Explicit VR Little Endian": "Deflate",
    "RLE Lossless": "RLE",
    "JPEG-LS Lossless Image Compression": "JPEG-LS",
    "JPEG-LS Lossy (Near-Lossless) Image Compression": "JPEG-LS near",
    "JPEG 2000 Image Compression (Lossless Only)": "J2K lossless",
    "JPEG 2000 Image Compression": "J2K",
    "JPEG Baseline (Process 1)": "JPEG baseline",
}


def _short_syntax(name: str) -> str:
    if name.startswith("JPEG Lossless"):
        return "JPEG lossless"
    return SHORT_SYNTAX.get(name, name)


def _series_table(result: Discovery) -> Table:
    table = Table(title="series (keys are hashed; no patient identifiers shown)")
    for name in ("study", "series", "kind", "mod", "slices", "vols", "shape", "spacing mm"):
        table.add_column(name, justify="right" if name in ("slices", "vols") else "left")
    table.add_column("gaps", justify="right")
    table.add_column("orientation")
    table.add_column("transfer syntax")
    table.add_column("warnings")
    refs = sorted(result.series, key=lambda r: (r.study_key, r.series_key))
    for ref in refs:
        table.add_row(
            short_key(ref.study_key),
            short_key(ref.series_key),
            ref.kind,
            ref.modality,
            str(ref.n_slices),
            str(ref.n_volumes),
            "x".join(str(n) for n in ref.shape),
            " x ".join(f"{s:.2f}" for s in ref.spacing),
            str(ref.n_gaps),
            ref.orientation,
            ", ".join(_short_syntax(ts) for ts in ref.transfer_syntaxes),
            "\n".join(ref.warnings) or "-",
        )
    return table


def _errors_table(result: Discovery, show_paths: bool) -> Table:
    from pdd_batch.ingest.discovery import error_row

    table = Table(title="files not used")
    table.add_column("file" if show_paths else "file key")
    table.add_column("status")
    table.add_column("reason")
    errors = result.errors()
    for rec in errors[:MAX_ERRORS_SHOWN]:
        row = error_row(rec, show_paths)
        name = row["file"] if show_paths else short_key(row["file_key"])
        table.add_row(name, row["status"], row["reason"])
    if len(errors) > MAX_ERRORS_SHOWN:
        table.add_row(f"... {len(errors) - MAX_ERRORS_SHOWN} more (use --json)", "", "")
    return table


def inspect_command(
    archive: Annotated[Path, typer.Argument(help="Archive folder (or one file) to inspect.")],
    as_json: Annotated[
        bool, typer.Option("--json", help="Print one JSON object instead of tables.")
    ] = False,
    open_archives: Annotated[
        bool, typer.Option("--open-archives", help="Look inside .zip/.tar files.")
    ] = False,
    follow_links_outside: FollowLinksOption = False,
    max_series_voxels: MaxVoxelsOption = RunConfig.max_series_voxels,
    max_frames_per_file: MaxFramesOption = RunConfig.max_frames_per_file,
    max_member_bytes: MaxMemberOption = RunConfig.max_member_bytes,
    max_compression_ratio: MaxRatioOption = RunConfig.max_compression_ratio,
    show_paths: Annotated[
        bool,
        typer.Option(
            "--show-paths",
            help="Name skipped and failed files by their relative path (folder names are often "
            "patient names: by default they are named by file key only).",
        ),
    ] = False,
) -> None:
    """List studies and series (modality, slices, spacing, orientation, syntax, warnings).

    Skipped and failed files are named by their file key (the ``file_key`` of ``screen``'s
    error rows), not by path, unless ``--show-paths``.
    """
    # pydicom/nibabel load here, not at `pdd-batch --help`.
    from pdd_batch.ingest.archive_io import IngestLimits
    from pdd_batch.ingest.discovery import DiscoveryError, discover, discovery_report

    limits = IngestLimits(
        max_series_voxels, max_frames_per_file, max_member_bytes, max_compression_ratio
    )
    try:
        result = discover(
            archive,
            open_archives=open_archives,
            limits=limits,
            follow_links_outside=follow_links_outside,
        )
    except DiscoveryError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(code=2) from exc
    if as_json:
        typer.echo(json.dumps(discovery_report(result, show_paths), sort_keys=True))
        return
    console = Console()
    if not console.is_terminal:
        console = Console(width=max(console.width, MIN_WIDTH))
    console.print(_series_table(result))
    counts = result.counts()
    from pdd_batch.cli.summary_view import counted

    studies = counted(len({r.study_key for r in result.series}), "study", "studies")
    console.print(
        f"files: {counts['seen']} seen = {counts['used']} used + {counts['skipped']} skipped"
        f" + {counts['failed']} failed; {len(result.series)} series in {studies}"
    )
    if result.errors():
        console.print(_errors_table(result, show_paths))
