"""The ``pdd-batch`` application: one module per command, registered here.

Importing this module must load neither torch nor Ray (``pdd-batch --help`` stays fast).
"""

from __future__ import annotations

import typer

from pdd_batch.cli import (
    bench,
    calibrate,
    doctor,
    evaluate,
    export,
    inspect,
    report,
    results,
    screen,
    summary,
    train,
)

app = typer.Typer(
    name="pdd-batch",
    help="Batch screening of DICOM/NIfTI archives with the PDD anomaly detector.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,
)

app.command("inspect")(inspect.inspect_command)
app.command("screen")(screen.screen_command)
app.command("train")(train.train_command)
app.command("evaluate")(evaluate.evaluate_command)
app.command("calibrate")(calibrate.calibrate_command)
app.command("export")(export.export_command)
app.command("report")(report.report_command)
app.command("summary")(summary.summary_command)
app.command("results")(results.results_command)
app.command("compact")(results.compact_command)
app.command("doctor")(doctor.doctor_command)
app.add_typer(bench.bench_app, name="bench")


def main() -> None:
    """Console-script entry point."""
    app()
