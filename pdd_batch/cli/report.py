"""`pdd-batch report RESULTS --out report.html`: a self-contained HTML report of a run."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from pdd_batch.review.report import write_report
from pdd_batch.runs.results import ResultsError, RunResults, open_run


def _model_dir(results: RunResults, model: Path | None) -> Path | None:
    """The run's checkpoint folder: --model, else the run config, else the embedded default."""
    if model is not None:
        return model
    recorded = (results.manifest.get("run_config") or {}).get("model_path")
    if recorded:
        return Path(recorded)
    spec = importlib.util.find_spec("model")  # locate, not import: no torch for a report
    if spec is not None and spec.origin:
        return Path(spec.origin).parent / "default_model"
    return None


def report_command(
    results: Annotated[Path, typer.Argument(help="Run folder written by `pdd-batch screen`.")],
    out: Annotated[Path, typer.Option("--out", help="HTML file to write.")] = Path("report.html"),
    model: Annotated[
        Path | None,
        typer.Option("--model", help="Checkpoint folder for the model card (default: the run's)."),
    ] = None,
) -> None:
    """Write a self-contained HTML report: summary, ranked studies, heatmaps, model card."""
    console = Console(stderr=True)
    try:
        run = open_run(results)
        path = write_report(run, out, _model_dir(run, model))
    except ResultsError as exc:
        console.print(f"[red]error:[/] {exc}")
        raise typer.Exit(code=2) from exc
    console.print(f"report written to {path}")
