"""`pdd-batch bench pipeline`: model-only vs end-to-end screening throughput on this machine.

Prints, in one run: model-only slices/s (the actor's model in-process, same device, threads and
batch size, on preprocessed slices), end-to-end slices/s through the whole Ray pipeline (steady
state, and including start-up), per-actor peak memory, and scaling from 1 to 2 actors. The last
line is ``pipeline efficiency: X.XX`` = end-to-end steady-state / model-only with one actor.
"""

from __future__ import annotations

import json
import logging
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import ray
import torch

from jobs.cluster import connect
from jobs.resources import ResourceError, plan_actors
from jobs.screen import ProgressEvent, resolve_model, run_screen
from pdd_batch.ingest.discovery import discover
from pdd_batch.ingest.preprocess import PreprocessSpec
from pdd_batch.ingest.sample import write_synthetic_ct_study
from pdd_batch.ingest.slicing import iter_model_slices
from pdd_batch.ingest.volume import load_series
from pdd_batch.runs.config import RunConfig

log = logging.getLogger(__name__)

TARGET_SECONDS = 20.0  # of model work per end-to-end run
SLICES_PER_SERIES = 16
SOURCE_SIZE = 256


def _paper_checkpoint(tmp: Path) -> Path:
    """A checkpoint of the paper architecture with seeded random weights (shapes and cost of
    the paper's model; its scores mean nothing)."""
    from model.bench import paper_architecture_config
    from model.checkpoint import save_checkpoint
    from model.pdd import build_model

    config = paper_architecture_config()
    spec = PreprocessSpec(image_size=config.image_size)
    return save_checkpoint(build_model(config), tmp / "paper", preprocessing=spec.to_dict())


def _checkpoint(model_path: Path | None, tmp: Path, paper: bool = False) -> Path:
    if paper:
        return _paper_checkpoint(tmp)
    if model_path is not None:
        return model_path
    try:
        from model.default import default_model_path

        path = default_model_path()
        if path.is_dir():
            return path
    except (ImportError, FileNotFoundError, OSError):
        pass
    from model.checkpoint import save_checkpoint
    from model.config import get_config
    from model.pdd import build_model

    torch.manual_seed(0)
    spec = PreprocessSpec(image_size=get_config("test").image_size)
    return save_checkpoint(
        build_model(get_config("test")), tmp / "ckpt", preprocessing=spec.to_dict()
    )


def _archive(root: Path, n_series: int) -> Path:
    for i in range(n_series):
        write_synthetic_ct_study(
            root / f"s{i:03d}",
            f"bench{i}",
            lesion=i % 4 == 0,
            n_slices=SLICES_PER_SERIES,
            size=SOURCE_SIZE,
        )
    return root


def model_only_rate(
    checkpoint: Path,
    images: np.ndarray,
    batch: int,
    threads: int,
    device: str = "cpu",
    seconds: float = 6.0,
    precision: str = "fp32",
) -> float:
    """Slices/s of ``model.predict`` alone on preprocessed (N, S, S) images, on ``device``.

    Three warm-up batches, then full batches cycled over ``images`` for at least ``seconds``;
    inputs start on the host and results come back to it, as in the actor.
    """
    from model.checkpoint import load_checkpoint

    torch.set_num_threads(threads)
    model = load_checkpoint(checkpoint, device=device).model
    x = torch.from_numpy(np.resize(images, (batch * 8, *images.shape[1:]))).unsqueeze(1)
    batches = [x[i : i + batch] for i in range(0, len(x), batch)]  # (B, 1, S, S) each
    with torch.inference_mode():
        for b in batches[:3]:
            model.predict(b.to(device), precision=precision).scores.cpu()
        done, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            for b in batches:
                out = model.predict(b.to(device), precision=precision)
                out.maps.cpu(), out.scores.cpu()
                done += len(b)
        return done / (time.perf_counter() - t0)


class _Clock:
    """Progress callback recording when slices arrived (for the steady-state rate)."""

    def __init__(self) -> None:
        self.points: list[tuple[float, int]] = []
        self.start = time.perf_counter()

    def __call__(self, ev: ProgressEvent) -> None:
        if ev.stage == "slices":
            self.points.append((time.perf_counter(), ev.done))

    def first_slice_s(self) -> float:
        return self.points[0][0] - self.start

    def steady_rate(self) -> float:
        (t0, n0), (t1, n1) = self.points[0], self.points[-1]
        return (n1 - n0) / (t1 - t0) if t1 > t0 else float("nan")


def _e2e(archive: Path, out: Path, ckpt: Path, actors: int, batch: int, precision: str) -> dict:
    cfg = RunConfig(
        archive=archive,
        out_dir=out,
        model_path=ckpt,
        num_actors=actors,
        batch_size=batch,
        precision=precision,
    )
    clock = _Clock()
    t0 = clock.start
    m = run_screen(cfg, progress=clock).manifest
    wall = time.perf_counter() - t0
    n = m["slices_written_this_run"]
    return {
        "steady": clock.steady_rate(),
        "wall": n / wall,
        "n": n,
        "seconds": wall,
        "first_s": clock.first_slice_s(),
        "peak_mb": m["actors"]["peak_rss_mb"],
    }


def run_pipeline_benchmark(
    print_fn: Callable[[str], None],
    model_path: Path | None = None,
    *,
    paper: bool = False,
    precision: str = "fp32",
    batch_size: int | None = None,
    target_seconds: float = TARGET_SECONDS,
) -> float:
    """Run the benchmark, print the figures; returns the pipeline efficiency.

    The efficiency uses the steady-state end-to-end rate (first slice to last slice at the
    driver): actor start-up and model loading are a fixed cost per run, printed separately.

    Args:
        model_path: checkpoint to run (default: the embedded model).
        paper: run the paper architecture with seeded random weights instead (GPU figures).
        precision: "fp32" or "bf16" forward (``model.precision``).
        batch_size: slices per model call (default: by device, ``jobs.resources``).
        target_seconds: model work per end-to-end run, which sizes the synthetic archive.
    """
    logging.getLogger("ray").setLevel(logging.WARNING)
    with tempfile.TemporaryDirectory(prefix="pdd-bench-") as tmp_s:
        tmp = Path(tmp_s)
        ckpt = _checkpoint(model_path, tmp, paper=paper)
        info = resolve_model(ckpt)
        images = _probe_images(
            tmp / "probe", PreprocessSpec.from_dict(json.loads(info.preprocessing))
        )
        with connect():
            plan = plan_actors(ray.cluster_resources(), num_actors=1, batch_size=batch_size)
            print_fn(
                f"model: {info.model_id} on {plan.device} ({precision}), batch {plan.batch_size}, "
                f"{plan.torch_threads} torch thread(s) per actor, "
                f"{ray.cluster_resources().get('CPU', 0):g} CPUs"
            )
            model_rate = model_only_rate(
                ckpt, images, plan.batch_size, plan.torch_threads, plan.device, precision=precision
            )
            print_fn(f"model-only: {model_rate:.2f} slices/s")
            n_series = max(2, int(model_rate * target_seconds / SLICES_PER_SERIES))
            archive = _archive(tmp / "archive", n_series)
            runs = _end_to_end_runs(print_fn, archive, tmp, ckpt, plan.batch_size, precision)
    return _print_efficiency(print_fn, runs, model_rate)


def _probe_images(folder: Path, spec: PreprocessSpec) -> np.ndarray:
    """The model input of one synthetic series, (Z, S, S) float32: the model-only workload."""
    disc = discover(_archive(folder, 1))
    series = load_series(disc.root, disc.series[0])
    return np.stack([s.image for s in iter_model_slices(series, spec)]).astype(np.float32)


def _end_to_end_runs(
    print_fn: Callable[[str], None], archive: Path, tmp: Path, ckpt: Path, batch: int,
    precision: str,
) -> dict[int, dict[str, float]]:  # fmt: skip
    """Screen ``archive`` with 1 and (where the cluster holds them) 2 actors; print each run."""
    runs = {}
    for actors in (1, 2):
        try:
            plan_actors(ray.cluster_resources(), num_actors=actors)
        except ResourceError as exc:
            print_fn(f"end-to-end, {actors} actors: skipped ({exc})")
            continue
        r = _e2e(archive, tmp / f"out{actors}", ckpt, actors, batch, precision)
        runs[actors] = r
        print_fn(
            f"end-to-end, {actors} actor(s): {r['steady']:.2f} slices/s steady "
            f"(first to last slice), {r['wall']:.2f} slices/s including start-up "
            f"({r['n']} slices in {r['seconds']:.1f} s, first after {r['first_s']:.1f} s)"
        )
        print_fn(f"per-actor peak memory, {actors} actor(s): {r['peak_mb']:.0f} MiB")
    return runs


def _print_efficiency(
    print_fn: Callable[[str], None], runs: dict[int, dict[str, float]], model_rate: float
) -> float:
    """Print the end-to-end / model-only ratio and the 1 -> 2 actor scaling; return the ratio."""
    ratio = runs[1]["steady"] / model_rate
    print_fn(f"end-to-end / model-only: {ratio:.2f}")
    if 2 in runs:
        print_fn(f"scaling 1 -> 2 actors: {runs[2]['steady'] / runs[1]['steady']:.2f}x")
    else:
        print_fn("scaling 1 -> 2 actors: n/a (the cluster cannot hold 2 actors)")
    print_fn(f"pipeline efficiency: {ratio:.2f}")
    return ratio
