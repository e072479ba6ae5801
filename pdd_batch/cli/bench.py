"""`pdd-batch bench ...`: benchmarks that print measured figures (never run as tests)."""

from __future__ import annotations

import typer

bench_app = typer.Typer(help="Benchmarks that print measured figures.", no_args_is_help=True)


@bench_app.command("scan")
def bench_scan() -> None:
    """Selective-scan speed-up of the vectorised torch scan over the sequential reference."""
    from model.bench import run_scan_benchmark

    run_scan_benchmark(print_fn=typer.echo)


@bench_app.command("pipeline")
def bench_pipeline() -> None:
    """Model-only vs end-to-end screening throughput; last line `pipeline efficiency: X.XX`."""
    from jobs.bench import run_pipeline_benchmark

    run_pipeline_benchmark(print_fn=typer.echo)


@bench_app.command("ingest")
def bench_ingest() -> None:
    """Discovery headers/s and decode+window+resize slices/s."""
    from pdd_batch.bench_ingest import run_ingest_benchmark

    run_ingest_benchmark(print_fn=typer.echo)
