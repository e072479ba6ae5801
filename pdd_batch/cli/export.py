"""`pdd-batch export RESULTS --out DIR`: flagged studies for review, de-identified by default."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from pdd_batch.cli.pacs import (
    AllowInsecureHttpOption,
    ExportToOption,
    NetrcOption,
    export_to_pacs_command,
)
from pdd_batch.cli.report import ArchiveOption, ScreenCrosswalkOption
from pdd_batch.ingest.keys import SiteKeyError
from pdd_batch.review.export import ExportError, ExportOptions, export_run
from pdd_batch.review.overlay import SourceLocator, SourceNotFoundError
from pdd_batch.runs.results import ResultsError, open_run


def export_command(
    results: Annotated[Path, typer.Argument(help="Run folder written by `pdd-batch screen`.")],
    out: Annotated[Path | None, typer.Option("--out", help="New (or empty) export folder.")] = None,
    top: Annotated[
        int | None, typer.Option("--top", help="Export the N highest-scoring studies.")
    ] = None,
    min_score: Annotated[
        float | None, typer.Option("--min-score", help="Export studies with max score >= S.")
    ] = None,
    deidentify: Annotated[
        bool,
        typer.Option(
            "--deidentify/--keep-identifiers",
            help="De-identify (DICOM PS3.15 basic profile; NIfTI header text) - the default.",
        ),
    ] = True,
    secondary_capture: Annotated[
        bool,
        typer.Option("--secondary-capture", help="Also write a DICOM SC series of the overlays."),
    ] = False,
    crosswalk: Annotated[
        Path | None,
        typer.Option("--crosswalk", help="Write new->original identifiers here (mode 0600)."),
    ] = None,
    allow_burned_in: Annotated[
        bool,
        typer.Option(
            "--allow-burned-in",
            help="Also export files that may show burned-in text (BurnedInAnnotation=YES, or "
            "absent on OT/XA/RF/DX/CR/MG/US/SC... or a screen capture), with a warning. "
            "By default they are withheld.",
        ),
    ] = False,
    archive: ArchiveOption = None,
    screen_crosswalk: ScreenCrosswalkOption = None,
    to: Annotated[str | None, ExportToOption] = None,
    netrc: NetrcOption = None,
    allow_insecure_http: AllowInsecureHttpOption = False,
) -> None:
    """Export flagged studies: images, heatmap overlays, manifest.csv and export.json
    (--out), or an SR and a key-image selection into each original study on a PACS (--to).

    Without --top/--min-score the studies whose decision is "flagged" are exported. Files that
    may show burned-in text, and their overlays, are withheld (listed in export.json and
    manifest.csv) unless --allow-burned-in is given. Runs name files only by key: give --archive
    (the folder that was screened) or --screen-crosswalk.
    """
    console = Console(stderr=True)
    if to is not None:
        export_to_pacs_command(
            console, results, to, top, min_score, netrc, secondary_capture, allow_insecure_http
        )
    if out is None:
        console.print("[red]error:[/] give --out DIR (or --to dicomweb+http(s)://...)")
        raise typer.Exit(code=2)
    try:
        options = ExportOptions(
            top=top,
            min_score=min_score,
            deidentify=deidentify,
            secondary_capture=secondary_capture,
            crosswalk=crosswalk,
            allow_burned_in=allow_burned_in,
        )
        run = open_run(results)
        locator = SourceLocator.for_run(run, archive, screen_crosswalk)
        summary = export_run(run, out, options, locator)
    except (ExportError, ResultsError, SourceNotFoundError, SiteKeyError) as exc:
        console.print(f"[red]error:[/] {exc}")
        raise typer.Exit(code=2) from exc
    if not deidentify:
        console.print("[yellow]warning:[/] identifiers kept (--keep-identifiers)")
    from pdd_batch.cli.summary_view import counted

    console.print(
        f"exported {counted(len(summary.studies), 'study', 'studies')}, "
        f"{counted(summary.n_files, 'file')}, {counted(summary.n_overlays, 'overlay')} to {out}"
        + (f"; [red]{len(summary.errors)} errors[/] (see export.json)" if summary.errors else "")
    )
    if summary.withheld:
        console.print(
            f"[yellow]withheld:[/] {len(summary.withheld)} files/overlays that may show "
            "burned-in text (listed in export.json; --allow-burned-in exports them)"
        )
    for w in summary.warnings:
        console.print(f"[yellow]warning:[/] {w['study']}: {w['warning']}")
    raise typer.Exit(code=1 if summary.errors else 0)
