"""`pdd-batch report RESULTS --out report.html`: a self-contained HTML report of a run."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from pdd_batch.ingest.keys import SiteKeyError
from pdd_batch.review.overlay import SourceLocator, SourceNotFoundError
from pdd_batch.review.report import write_report
from pdd_batch.runs.results import ResultsError, RunResults, open_run

ArchiveOption = Annotated[
    Path | None,
    typer.Option(
        "--archive",
        help="The folder that was screened: source files are found by recomputing their keys.",
    ),
]
ScreenCrosswalkOption = Annotated[
    Path | None,
    typer.Option(
        "--screen-crosswalk",
        help="Crosswalk written by `pdd-batch screen --crosswalk` (keys -> paths).",
    ),
]


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


def _locator(
    run: RunResults, archive: Path | None, crosswalk: Path | None, heatmaps_only: bool
) -> SourceLocator | None:
    """How the report finds source slices; None draws heatmaps alone.

    Raises:
        SourceNotFoundError: a keyed run without --archive/--screen-crosswalk/--heatmaps-only.
    """
    if heatmaps_only:
        return None
    keyed = not run.legacy_paths and run.key_id is not None
    if not keyed and archive is None and run.archive_root is None:
        return None  # a 1.0 run that recorded no archive: heatmaps alone, as before
    try:
        return SourceLocator.for_run(run, archive, crosswalk)
    except SourceNotFoundError as exc:
        raise SourceNotFoundError(f"{exc}; or --heatmaps-only") from exc


def report_command(
    results: Annotated[Path, typer.Argument(help="Run folder written by `pdd-batch screen`.")],
    out: Annotated[Path, typer.Option("--out", help="HTML file to write.")] = Path("report.html"),
    model: Annotated[
        Path | None,
        typer.Option("--model", help="Checkpoint folder for the model card (default: the run's)."),
    ] = None,
    archive: ArchiveOption = None,
    screen_crosswalk: ScreenCrosswalkOption = None,
    heatmaps_only: Annotated[
        bool, typer.Option("--heatmaps-only", help="Draw heatmaps without the source slices.")
    ] = False,
) -> None:
    """Write a self-contained HTML report: summary, ranked studies, heatmaps, model card.

    Heatmaps are drawn over the source slices, found in --archive (or through
    --screen-crosswalk); runs name files only by key, so one of them is needed unless
    --heatmaps-only.
    """
    console = Console(stderr=True)
    try:
        run = open_run(results)
        locator = _locator(run, archive, screen_crosswalk, heatmaps_only)
        path = write_report(run, out, _model_dir(run, model), locator)
    except (ResultsError, SourceNotFoundError, SiteKeyError) as exc:
        console.print(f"[red]error:[/] {exc}")
        raise typer.Exit(code=2) from exc
    console.print(f"report written to {path}")
