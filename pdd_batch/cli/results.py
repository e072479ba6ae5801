"""`pdd-batch results RUN`: the live rows of a run folder; `pdd-batch compact RUN`: merge small
result files (maintenance).

``results`` is the one documented way to get exactly the current rows of a run folder without
Python (docs/screening.md): it reads ``live_files.json`` through ``pdd_batch.runs.results``,
prints the rows (CSV or JSON lines) or exports them to one Parquet file, or lists the live files
for DuckDB, pyarrow.dataset or Ray Data (``--files``).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer

from pdd_batch.runs.results import ResultsError, live_files, read_table

TABLE_NAMES = ("slices", "studies", "errors", "heatmaps")


def _fail(message: str, code: int = 2) -> typer.Exit:
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(code=code)


def results_command(
    run: Annotated[Path, typer.Argument(help="Run folder written by `pdd-batch screen`.")],
    table: Annotated[
        str, typer.Option(help="slices | studies | errors | heatmaps (PNG bytes).")
    ] = "studies",
    columns: Annotated[
        str | None, typer.Option(help="Comma-separated columns (default: all).")
    ] = None,
    fmt: Annotated[str, typer.Option("--format", help="csv | jsonl (printed).")] = "csv",
    out: Annotated[
        Path | None, typer.Option(help="Write the rows to this Parquet file instead.")
    ] = None,
    files: Annotated[
        bool, typer.Option(help="Print the live Parquet files of the table, one a line.")
    ] = False,
) -> None:
    """Print or export the live rows of one table of a run (exactly the current rows)."""
    if table not in TABLE_NAMES:
        raise _fail(f"--table must be one of {', '.join(TABLE_NAMES)}")
    if not run.is_dir():
        raise _fail("run folder not found")
    try:
        if files:
            listed = live_files(run, table)
            if listed is None:
                listed = sorted((run / table).glob("*.parquet"))
            for p in listed:
                typer.echo(str(p))
            return
        wanted = [c.strip() for c in columns.split(",")] if columns else None
        rows = read_table(run, table, columns=wanted)
    except ResultsError as exc:
        raise _fail(str(exc)) from exc
    if out is not None:
        import pyarrow.parquet as pq

        from pdd_batch.runs.writer import write_atomic

        write_atomic(out, lambda fh: pq.write_table(rows, fh, compression="zstd"))
        typer.echo(f"{rows.num_rows} rows -> {out.name}")
        return
    _print(rows, fmt)


def _print(rows, fmt: str) -> None:
    """Rows to stdout: CSV with a header, or one JSON object a line (bytes as hex)."""
    if fmt == "csv":
        import pyarrow.csv as pcsv

        printable = rows.drop_columns([c for c in rows.column_names if c == "heatmap_png"])
        pcsv.write_csv(printable, sys.stdout.buffer)
        return
    if fmt != "jsonl":
        raise _fail("--format must be csv or jsonl")
    for row in rows.to_pylist():
        clean = {k: (v.hex() if isinstance(v, bytes) else v) for k, v in row.items()}
        typer.echo(json.dumps(clean, sort_keys=True, default=str))


def compact_command(
    run: Annotated[Path, typer.Argument(help="Run folder written by `pdd-batch screen`.")],
    target_rows: Annotated[
        int, typer.Option(min=2, help="Rows per merged file (files smaller are merged).")
    ] = 1 << 20,
) -> None:
    """Merge the small result files of a run into larger ones (a maintenance step; no run may
    be writing to the folder). Rows and readers are unchanged."""
    from datetime import UTC, datetime

    from pdd_batch.runs.live import compact
    from pdd_batch.runs.state import RunLockedError, RunState, run_lock

    if not (run / "_state").is_dir():
        raise _fail("not a run folder of this version (no _state/)")
    try:
        with run_lock(run):
            state = RunState.load(run)
            state.reconcile()
            run_id = "compact-" + datetime.now(UTC).strftime("%Y%m%dT%H%M%S")
            merged = compact(state, run_id, target_rows=target_rows)
    except RunLockedError as exc:
        raise _fail(str(exc), code=3) from exc
    for tbl, n in merged.items():
        typer.echo(f"{tbl}: {n} files merged")
