"""`pdd-batch train`: placeholder until its issue lands."""

from __future__ import annotations

import typer


def train_command() -> None:
    """Not available yet in this build."""
    typer.echo("pdd-batch train: not implemented yet in this build", err=True)
    raise typer.Exit(code=2)
