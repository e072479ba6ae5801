"""Selective-scan benchmark: the vectorised torch scan against the sequential reference.

Run with ``pdd-batch bench scan`` or ``python -m model.bench``. The inputs are the real scan
inputs of a VMamba-Tiny stage-1 block (v0 initialisation) on a 256x256 image: Bt=1, 64x64 = 4096
tokens, d_inner 192, d_state 16, K=4, i.e. ``u`` (1, 768, 4096). Prints measured times only
(wall-clock and CPU time of this process). ``python -m model.bench [THREADS]`` sets the torch
thread count (default 1).

What to expect on CPU: the reference loop's per-step tensors (here 12k elements) stay in L1 and
its per-op overhead is amortised, so in eager PyTorch the chunked scan's single-thread gain is
modest (it removes the 4096-step Python loop, not arithmetic). Its per-chunk ops are large
enough to use several threads, which the reference's small ops are not.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch

from model.scan import (
    DEFAULT_CHUNK,
    scan_backend,
    selective_scan,
    selective_scan_reference,
)

STAGE1_DIM = 96  # VMamba-T stage 1: d_model 96, d_inner 192
STAGE1_SIDE = 64  # 256 px / patch 4


def stage1_scan_inputs(seed: int = 0, side: int = STAGE1_SIDE) -> dict[str, torch.Tensor]:
    """Scan inputs of a freshly initialised VMamba-T stage-1 SS2D on layer-normed noise.

    ``side`` is the token grid side (64 at 256 px); smaller values only serve smoke tests.
    """
    from model.vmamba import SS2D

    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    block = SS2D(STAGE1_DIM).eval()
    x = torch.randn(1, side, side, STAGE1_DIM, generator=gen)  # (B, H, W, C)
    x = torch.nn.functional.layer_norm(x, (STAGE1_DIM,))
    with torch.no_grad():
        return block.scan_inputs(x)


def _median_seconds(
    fn: Callable[[], torch.Tensor], repeats: int
) -> tuple[float, float, torch.Tensor]:
    """Median wall-clock and median process-CPU seconds of ``fn`` over ``repeats`` runs."""
    walls, cpus, out = [], [], None
    for _ in range(repeats):
        wall, cpu = time.perf_counter(), time.process_time()
        out = fn()
        cpus.append(time.process_time() - cpu)
        walls.append(time.perf_counter() - wall)
    return statistics.median(walls), statistics.median(cpus), out


def run_scan_benchmark(
    print_fn: Callable[[str], object] = print,
    repeats: int = 3,
    threads: int | None = 1,
    chunk: int = DEFAULT_CHUNK,
    side: int = STAGE1_SIDE,
) -> float:
    """Time both scans at the VMamba-T stage-1 size; last printed line is ``scan speedup: X.Y``.

    Args:
        print_fn: Where the lines go.
        repeats: Timed runs of each scan (the median is reported), after one warm-up run.
        threads: torch intra-op threads while timing (None keeps the current setting).
        chunk: Chunk size of the torch scan.
        side: Token grid side (64 = the real stage-1 size; smaller only for smoke tests).

    Returns:
        The speed-up (reference median / torch scan median): in process CPU time with one
        thread (shared cores make wall-clock times swing with other jobs), else wall-clock.
    """
    saved = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        args = stage1_scan_inputs(side=side)
        with torch.no_grad():
            selective_scan(**args, chunk=chunk)  # warm-up
            fast = _median_seconds(lambda: selective_scan(**args, chunk=chunk), repeats)
            ref = _median_seconds(lambda: selective_scan_reference(**args), repeats)
    finally:
        torch.set_num_threads(saved)
    shape = "x".join(str(s) for s in args["u"].shape)
    print_fn(f"selective scan, u {shape}, d_state {args['A'].shape[1]}, K {args['B'].shape[1]}")
    print_fn(f"backend: {scan_backend('cpu')}, chunk {chunk}, torch threads {threads or saved}")
    for name, (wall, cpu, _) in (
        ("reference (sequential loop)", ref),
        ("torch scan (chunked)", fast),
    ):
        print_fn(
            f"{name:28s} wall {wall * 1e3:8.1f} ms, cpu {cpu * 1e3:8.1f} ms (median of {repeats})"
        )
    print_fn(f"max abs difference: {float((fast[2] - ref[2]).abs().max()):.2e}")
    print_fn(f"wall-clock speedup: {ref[0] / fast[0]:.1f}")
    print_fn(f"cpu-time speedup: {ref[1] / fast[1]:.1f}")
    one_thread = (threads or saved) == 1
    speedup = ref[1] / fast[1] if one_thread else ref[0] / fast[0]
    print_fn(f"scan speedup: {speedup:.1f}")
    return speedup


if __name__ == "__main__":
    import sys

    run_scan_benchmark(threads=int(sys.argv[1]) if len(sys.argv) > 1 else 1)
