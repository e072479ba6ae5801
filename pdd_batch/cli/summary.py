"""`pdd-batch summary RESULTS`: reprint the rich summary of a finished screening run."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from pdd_batch.cli.summary_view import render_summary
from pdd_batch.runs.results import ResultsError


def summary_command(
    results: Annotated[Path, typer.Argument(help="Run folder written by `pdd-batch screen`.")],
) -> None:
    """Reprint the summary of a run: the review queue (flagged, then not-assessed studies, by
    score), outcome counts, accounting.

    Exit status: the run's exit code (its manifest's; docs/screening.md "Exit codes"), 0 only
    when it completed with every input accounted for, 2 when the folder cannot be read; never
    the findings: flagged or not-assessed studies do not change it.
    """
    console = Console()
    try:
        code = render_summary(console, results)
    except ResultsError as exc:
        console.print(f"[red]error:[/] {exc}")
        raise typer.Exit(code=2) from exc
    raise typer.Exit(code=code)
