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

import contextlib
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING
from unittest import mock

import torch

from model.scan import (
    BACKEND_ENV,
    DEFAULT_CHUNK,
    TORCH_BACKEND,
    scan_backend,
    selective_scan,
    selective_scan_reference,
)

if TYPE_CHECKING:  # pragma: no cover - annotations only
    from model.config import ModelConfig

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


def paper_architecture_config() -> ModelConfig:
    """The paper config with seeded random teachers: the paper's shapes and cost, no weights
    needed (throughput does not depend on the weights' values)."""
    from model.config import get_config

    return get_config("paper", cnn_source="random", cnn_seed=0, mamba_source="random", mamba_seed=1)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def forward_rate(
    model: torch.nn.Module,
    batch: int,
    device: torch.device,
    precision: str,
    seconds: float,
) -> tuple[float, torch.Tensor]:
    """Slices/s of ``model.predict`` on (batch, 1, S, S) inputs already on ``device``.

    Two warm-up calls, then calls until ``seconds`` have passed (at least three); returns the
    rate and the scores of the first call.
    """
    size = int(model.config.image_size)
    x = torch.rand(batch, 1, size, size, generator=torch.Generator().manual_seed(0)).to(device)
    with torch.inference_mode():
        first = model.predict(x, precision=precision).scores.float().cpu()
        model.predict(x, precision=precision)
        _sync(device)
        calls, t0 = 0, time.perf_counter()
        while calls < 3 or time.perf_counter() - t0 < seconds:
            model.predict(x, precision=precision)
            calls += 1
        _sync(device)
        return calls * batch / (time.perf_counter() - t0), first


def run_forward_benchmark(
    print_fn: Callable[[str], object] = print,
    batch: int = 32,
    precisions: tuple[str, ...] = ("fp32", "bf16"),
    device: str | None = None,
    seconds: float = 5.0,
    config: ModelConfig | None = None,
    model_path: str | Path | None = None,
) -> dict[str, float]:
    """Forward (predict) throughput per precision; returns slices/s by precision.

    The model is the checkpoint at ``model_path`` if given, else ``config`` built with its
    teachers (default: the paper architecture, ``paper_architecture_config``). Also prints
    the largest relative score difference of each precision from the first one, and the scan
    backend in use. On CUDA, TF32 matrix products stay off (PyTorch's default).
    """
    from model.pdd import build_model

    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if model_path is not None:
        from model.checkpoint import load_checkpoint

        model = load_checkpoint(model_path, device=str(dev)).model.eval()
        config = model.config
    else:
        config = config or paper_architecture_config()
        model = build_model(config).to(dev).eval()
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
    print_fn(
        f"config {config.name} ({config.cnn_teacher.name} + "
        f"{config.mamba_teacher.name if config.mamba_teacher else 'no mamba'}, "
        f"{config.image_size} px), batch {batch}, on {name}, scan backend {scan_backend(dev)}"
    )
    rates, base = {}, None
    for precision in precisions:
        rate, scores = forward_rate(model, batch, dev, precision, seconds)
        rates[precision] = rate
        base = scores if base is None else base
        diff = float((scores - base).abs().max() / base.abs().max())
        print_fn(f"forward {precision}: {rate:.1f} slices/s (max score diff vs first {diff:.1e})")
    return rates


def run_train_benchmark(
    print_fn: Callable[[str], object] = print,
    images: int = 60,
    epochs: int = 100,
    batch: int = 16,
    steps: int = 3,
    config: ModelConfig | None = None,
    device: str | None = None,
) -> dict[str, float]:
    """What one ``pdd-batch train`` run of ``config`` costs on this machine (default: the paper
    architecture, 256 px, seeded random weights: the cost does not depend on the weights), on
    ``device`` (default: CUDA when there is one, else CPU).

    Times the teacher features of one batch (computed once per training image) and ``steps``
    head steps (Adam, PDD_SPEC §4) after one warm-up step, and prints the estimate for
    ``images`` training images and ``epochs`` epochs. Returns the measured figures.
    """
    from model.pdd import build_model
    from model.train_step import feature_bank, make_optimizer, train_step

    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    config = config or paper_architecture_config()
    torch.manual_seed(0)
    model = build_model(config).to(dev)
    size = int(config.image_size)
    x = torch.rand(batch, 1, size, size, generator=torch.Generator().manual_seed(0)).to(dev)
    feature_bank(model, x[:1], batch_size=1)  # warm-up (CUDA context, kernels)
    _sync(dev)
    t0 = time.perf_counter()
    bank = feature_bank(model, x, batch_size=batch)
    _sync(dev)
    feature_s = (time.perf_counter() - t0) / batch
    opt = make_optimizer(model.trainable_parameters())  # PDD_SPEC §4 defaults
    model.train()

    def step() -> torch.Tensor:
        loss = train_step(model, opt, bank).total
        _sync(dev)
        return loss

    step()  # warm-up
    step_s, _, _ = _median_seconds(step, steps)
    steps_per_epoch = -(-images // batch)
    total_s = feature_s * images + step_s * steps_per_epoch * epochs
    print_fn(
        f"config {config.name} ({config.cnn_teacher.name} + "
        f"{config.mamba_teacher.name if config.mamba_teacher else 'no mamba'}, {size} px), "
        f"head {sum(p.numel() for p in model.trainable_parameters()) / 1e6:.1f} M parameters, "
        f"on {dev.type}, torch threads {torch.get_num_threads()}, scan backend {scan_backend(dev)}"
    )
    print_fn(f"teacher features: {feature_s:.2f} s/image (once per training image)")
    print_fn(f"head step, batch {batch}: {step_s:.2f} s (median of {steps})")
    print_fn(f"estimated train run, {images} images x {epochs} epochs: {total_s / 60:.1f} min")
    return {"feature_s_per_image": feature_s, "step_s": step_s, "estimate_s": total_s}


def run_kernel_check(print_fn: Callable[[str], object] = print, batch: int = 32) -> float:
    """CUDA: mamba-ssm's kernel and the torch scan against the sequential reference, and their
    times at the VMamba-T stage-1 size; returns the kernel's max abs difference (fp32)."""
    dev = torch.device("cuda")
    args = {k: v.to(dev) for k, v in stage1_scan_inputs().items()}  # u (1, 768, 4096)
    with torch.no_grad():
        ref = selective_scan_reference(**{k: v.double() for k, v in args.items()}).float()
        kernel = selective_scan(**args)
        with _scan_backend_env(TORCH_BACKEND):
            torch_scan = selective_scan(**args)
        low = {k: (v.bfloat16() if k in ("u", "delta", "B", "C") else v) for k, v in args.items()}
        kernel_bf16 = selective_scan(**low)
    scale = float(ref.abs().max())
    print_fn(f"scan backend on cuda: {scan_backend(dev)}; |y| max {scale:.3g}")
    err = float((kernel - ref).abs().max())
    print_fn(f"kernel fp32 vs float64 reference: max abs {err:.2e}")
    for label, y in (("torch scan (cuda)", torch_scan), ("kernel bf16 inputs", kernel_bf16)):
        print_fn(f"{label} vs reference: max abs {float((y - ref).abs().max()):.2e}")
    # the same image repeated: u, delta (batch, 768, 4096), B, C (batch, 4, 16, 4096)
    big = {
        k: v.expand(batch, *v.shape[1:]).contiguous() if v.dim() > 2 else v for k, v in args.items()
    }
    for label, backend in (("kernel", None), ("torch scan", TORCH_BACKEND)):
        with torch.no_grad(), _scan_backend_env(backend):
            selective_scan(**big)
            _sync(dev)
            t0 = time.perf_counter()
            for _ in range(5):
                selective_scan(**big)
            _sync(dev)
        ms = (time.perf_counter() - t0) / 5 * 1e3
        print_fn(f"{label}: {ms:.2f} ms per scan of u {tuple(big['u'].shape)}")
    return err


def _scan_backend_env(value: str | None) -> contextlib.AbstractContextManager:
    """Run the block with ``PDD_SCAN_BACKEND=value`` (``None``: as it is); restored after."""
    if value is None:
        return contextlib.nullcontext()
    return mock.patch.dict(os.environ, {BACKEND_ENV: value})


if __name__ == "__main__":
    import sys

    run_scan_benchmark(threads=int(sys.argv[1]) if len(sys.argv) > 1 else 1)
