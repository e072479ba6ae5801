"""`pdd-batch doctor`: placeholder until its issue lands."""

from __future__ import annotations

import typer


def doctor_command() -> None:
    """Not available yet in this build."""
    typer.echo("pdd-batch doctor: not implemented yet in this build", err=True)
    raise typer.Exit(code=2)
