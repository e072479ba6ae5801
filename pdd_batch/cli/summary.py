"""`pdd-batch summary`: placeholder until its issue lands."""

from __future__ import annotations

import typer


def summary_command() -> None:
    """Not available yet in this build."""
    typer.echo("pdd-batch summary: not implemented yet in this build", err=True)
    raise typer.Exit(code=2)
