"""`pdd-batch bench ...`: benchmarks that print measured figures (never run as tests)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from pdd_batch.cli.options import ModelOption

bench_app = typer.Typer(help="Benchmarks that print measured figures.", no_args_is_help=True)


@bench_app.command("scan")
def bench_scan() -> None:
    """Selective-scan speed-up of the vectorised torch scan over the sequential reference."""
    from model.bench import run_scan_benchmark

    run_scan_benchmark(print_fn=typer.echo)


@bench_app.command("pipeline")
def bench_pipeline(
    model: ModelOption = None,
    paper: Annotated[
        bool, typer.Option(help="The paper architecture, seeded random weights (GPU figures).")
    ] = False,
    precision: Annotated[str, typer.Option(help="fp32 or bf16.")] = "fp32",
    batch_size: Annotated[int | None, typer.Option(min=1, help="Slices per model call.")] = None,
    seconds: Annotated[
        float, typer.Option(min=1.0, help="Model work per end-to-end run (sizes the archive).")
    ] = 20.0,
) -> None:
    """Model-only vs end-to-end screening throughput; last line `pipeline efficiency: X.XX`."""
    from jobs.bench import run_pipeline_benchmark

    run_pipeline_benchmark(
        print_fn=typer.echo,
        model_path=model,
        paper=paper,
        precision=_precision(precision),
        batch_size=batch_size,
        target_seconds=seconds,
    )


@bench_app.command("forward")
def bench_forward(
    batch: Annotated[int, typer.Option(min=1, help="Slices per call.")] = 32,
    device: Annotated[str | None, typer.Option(help="cuda or cpu (default: cuda if any).")] = None,
    seconds: Annotated[float, typer.Option(min=0.1, help="Timed seconds per precision.")] = 5.0,
    model: Annotated[
        Path | None,
        typer.Option(help="Checkpoint folder (default: the paper architecture, random weights)."),
    ] = None,
    default_model: Annotated[bool, typer.Option(help="The embedded default model.")] = False,
) -> None:
    """Forward throughput in fp32 and bf16 (slices/s), by default of the paper architecture."""
    from model.bench import run_forward_benchmark

    if default_model:
        from model.default import default_model_path

        model = default_model_path()
    run_forward_benchmark(
        print_fn=typer.echo, batch=batch, device=device, seconds=seconds, model_path=model
    )


@bench_app.command("train")
def bench_train(
    images: Annotated[int, typer.Option(min=1, help="Training images of the estimated run.")] = 60,
    epochs: Annotated[int, typer.Option(min=1, help="Epochs of the estimated run.")] = 100,
    batch: Annotated[int, typer.Option(min=1, help="Training batch (PDD_SPEC: 16).")] = 16,
    steps: Annotated[int, typer.Option(min=1, help="Timed head steps.")] = 3,
    device: Annotated[str | None, typer.Option(help="cuda or cpu (default: cuda if any).")] = None,
) -> None:
    """Cost of training the paper architecture (256 px): features, head step, run estimate."""
    from model.bench import run_train_benchmark

    run_train_benchmark(
        print_fn=typer.echo, images=images, epochs=epochs, batch=batch, steps=steps, device=device
    )


@bench_app.command("kernel")
def bench_kernel() -> None:
    """CUDA only: mamba-ssm's scan kernel and the torch scan vs the reference, and their times."""
    import torch

    if not torch.cuda.is_available():
        typer.echo("no CUDA device: the kernel check needs one")
        raise typer.Exit(code=2)
    from model.bench import run_kernel_check

    run_kernel_check(print_fn=typer.echo)


def _precision(value: str) -> str:
    from pdd_batch.runs.config import PRECISIONS

    if value not in PRECISIONS:
        raise typer.BadParameter(f"precision must be one of {PRECISIONS}, got {value!r}")
    return value


@bench_app.command("ingest")
def bench_ingest(
    sharded_files: Annotated[
        int,
        typer.Option(
            min=0,
            help="Also time discovery of this many files in process vs in Ray shard tasks "
            "on a local cluster (0: skip).",
        ),
    ] = 0,
    num_cpus: Annotated[int, typer.Option(min=1, help="CPUs of that local cluster.")] = 2,
) -> None:
    """Discovery headers/s and decode+window+resize slices/s (and, with --sharded-files,
    in-process vs sharded discovery)."""
    from pdd_batch.ingest.bench import run_ingest_benchmark

    if sharded_files:
        from jobs.bench_shards import run_shard_benchmark

        run_shard_benchmark(print_fn=typer.echo, n_files=sharded_files, num_cpus=num_cpus)
    run_ingest_benchmark(print_fn=typer.echo)


@bench_app.command("nightly")
def bench_nightly(
    sizes: Annotated[
        str, typer.Option(help="Comma-separated numbers of recorded series per store.")
    ] = "1000,100000,1000000",
    discovery_files: Annotated[
        int, typer.Option(min=0, help="Files of the unchanged archive discovered twice (0: skip).")
    ] = 100_000,
    rounds: Annotated[int, typer.Option(min=1, help="Nights timed per store.")] = 3,
    workdir: Annotated[
        Path | None, typer.Option(help="Folder for the synthetic stores (default: the temp dir).")
    ] = None,
) -> None:
    """Nightly bookkeeping cost vs history (synthetic, no model); last line
    `nightly cost ratio 1e6/1e3: X.XX` (commit + publish per new series)."""
    from pdd_batch.runs.bench_nightly import run_nightly_benchmark

    run_nightly_benchmark(
        print_fn=typer.echo,
        sizes=tuple(int(s) for s in sizes.split(",")),
        discovery_files=discovery_files,
        rounds=rounds,
        workdir=workdir,
    )
