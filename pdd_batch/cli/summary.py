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
    """Reprint the summary of a run: flagged studies ranked by score, counts, accounting."""
    console = Console()
    try:
        code = render_summary(console, results)
    except ResultsError as exc:
        console.print(f"[red]error:[/] {exc}")
        raise typer.Exit(code=2) from exc
    raise typer.Exit(code=code)
