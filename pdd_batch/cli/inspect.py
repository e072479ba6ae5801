"""`pdd-batch inspect`: placeholder until its issue lands."""

from __future__ import annotations

import typer


def inspect_command() -> None:
    """Not available yet in this build."""
    typer.echo("pdd-batch inspect: not implemented yet in this build", err=True)
    raise typer.Exit(code=2)
