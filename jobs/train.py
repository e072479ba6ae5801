"""Training on normal images: cached teacher features, seeded, resumable, self-describing output.

``train_model`` runs in-process; ``run_training`` runs it as one Ray actor (a GPU when the cluster
has one) when an address is given (``--address`` or ``RAY_ADDRESS``), else in-process. Progress
goes through a callback (the CLI draws the bar); nothing here prints.

Recipe (PDD_SPEC §4): Adam 2e-3, betas (0.5, 0.999); CosineAnnealingLR(T_max=40, eta_min=2e-4)
stepped per epoch; 100 epochs; batch 16; no augmentation by default. The frozen teachers see each
image once (``model.train_step.feature_bank``). With ``augment_views=K`` each image gets K fixed,
seeded views (the original and K − 1 random flips/rotations/shifts/scalings), all K cached, and
every epoch each image contributes one view drawn at random. After every epoch ``OUT/resume.pt``
holds the head, optimiser, scheduler and shuffling RNG, so ``resume=True`` continues exactly where
a killed run stopped.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from model.config import ModelConfig
from model.ood import fit_ood, pool_levels
from model.train_step import (
    feature_bank,
    make_optimizer,
    make_scheduler,
    select,
    train_step,
    trainable_state,
)
from pdd_batch.evaluation.datasets import ImageItem
from pdd_batch.ingest.framing import AUTO, FramingError, resolve_framing
from pdd_batch.ingest.preprocess import PreprocessError, PreprocessSpec, load_image_file

log = logging.getLogger(__name__)

RESUME_FILE = "resume.pt"


class TrainError(RuntimeError):
    """Training cannot start or continue (no usable images, a resume state that does not fit)."""


@dataclass(frozen=True)
class TrainConfig:
    """Run configuration of one training (model configuration is separate: ``ModelConfig``)."""

    epochs: int = 100
    batch_size: int = 16
    lr: float = 2e-3
    betas: tuple[float, float] = (0.5, 0.999)
    t_max: int = 40
    eta_min: float = 2e-4
    seed: int = 0
    max_images: int | None = None  # cap on training images (seeded choice); None = all
    feature_batch: int = 16
    augment_views: int = 0  # K > 1: K cached views per image (view 0 = original); 0/1 = none

    def __post_init__(self) -> None:
        if self.augment_views < 0:
            raise TrainError(f"TrainConfig.augment_views must be >= 0, got {self.augment_views}")
        for key in ("epochs", "batch_size", "t_max", "feature_batch"):
            if int(getattr(self, key)) < 1:
                raise TrainError(f"TrainConfig.{key} must be >= 1, got {getattr(self, key)}")
        if not self.lr > 0:
            raise TrainError(f"TrainConfig.lr must be > 0, got {self.lr}")
        if self.max_images is not None and self.max_images < 1:
            raise TrainError(f"TrainConfig.max_images must be >= 1, got {self.max_images}")


@dataclass(frozen=True)
class TrainProgress:
    """One progress report: after each step (``step`` > 0) and at the end of each epoch."""

    epoch: int  # 1-based epoch in progress
    epochs: int
    step: int  # step within the epoch (0 at epoch end)
    steps_per_epoch: int
    loss: float
    lr: float
    phase: str = "train"  # "features" while the teacher bank is computed, "train", "done"


@dataclass
class TrainResult:
    """What a training run produced."""

    checkpoint: Path
    epochs_run: int
    epoch_losses: list[float]
    n_images: int
    errors: list[dict[str, str]] = field(default_factory=list)
    wall_s: float = 0.0
    model: nn.Module | None = None


ProgressFn = Callable[[TrainProgress], None]


def load_images(
    items: Sequence[ImageItem], spec: PreprocessSpec
) -> tuple[np.ndarray, list[ImageItem], list[dict[str, str]]]:
    """Load items as (N, S, S) float32 in [0, 1]; unreadable files become error records."""
    arrays, kept, errors = [], [], []
    for it in items:
        try:
            arrays.append(load_image_file(it.path, spec))
            kept.append(it)
        except PreprocessError as exc:
            errors.append({"file": it.rel, "stage": "load", "reason": str(exc)})
            log.warning("skipping an unreadable image (listed in the error records)")
    size = spec.image_size
    stack = np.stack(arrays) if arrays else np.zeros((0, size, size), np.float32)
    return stack, kept, errors


@dataclass(frozen=True)
class ArchivePart:
    """The studies of an archive of normal studies that one training (or validation) reads:
    ``studies`` are ``SeriesRef.study_key`` values (selection holds studies out, never slices)."""

    root: Path
    studies: frozenset[str]


def archive_images(
    archive: Path, spec: PreprocessSpec, run: TrainConfig, studies: frozenset[str] | None = None
) -> tuple[np.ndarray, list[str], list[dict[str, str]]]:
    """Every model slice of an archive of normal studies, read like ``screen`` reads them.

    Series that cannot be read become error records (file, stage, reason) and are skipped; with
    ``run.max_images`` a seeded subset of slices is kept; with ``studies`` only the series of
    those studies are read.

    Returns:
        (images (N, S, S) float32 in [0, 1], names "series_key:volume:slice", errors).
    """
    from pdd_batch.ingest.discovery import discover
    from pdd_batch.ingest.slicing import iter_model_slices
    from pdd_batch.ingest.volume import SeriesReadError, load_series

    found = discover(Path(archive))
    arrays, names = [], []
    errors = [{"file": r.path, "stage": "discover", "reason": r.reason}
              for r in found.files if r.status == "failed"]  # fmt: skip
    for ref in found.series:
        if studies is not None and ref.study_key not in studies:
            continue
        try:
            series = load_series(found.root, ref)
            for sl in iter_model_slices(series, spec):
                arrays.append(sl.image)
                names.append(f"{ref.series_key}:{sl.volume_index}:{sl.slice_index}")
        except SeriesReadError as exc:
            errors.append({"file": ref.files[0], "stage": "read", "reason": str(exc)})
            log.warning("skipping an unreadable series (listed in the error records)")
    if run.max_images is not None and len(arrays) > run.max_images:
        rng = np.random.default_rng(run.seed)
        keep = sorted(rng.choice(len(arrays), size=run.max_images, replace=False).tolist())
        arrays, names = [arrays[i] for i in keep], [names[i] for i in keep]
    size = spec.image_size
    stack = np.stack(arrays) if arrays else np.zeros((0, size, size), np.float32)
    return stack, names, errors


def archive_scope(archive: Path, spec: PreprocessSpec) -> dict[str, Any]:
    """The scope of a model trained on an archive, from its series' headers
    (``pdd_batch.ingest.scope.derive_scope``), as the checkpoint records it.

    Raises:
        TrainError: the archive holds no series to derive it from.
    """
    from pdd_batch.ingest.discovery import discover
    from pdd_batch.ingest.scope import ScopeError, derive_scope

    try:
        return derive_scope(discover(Path(archive)).series, spec.to_dict()).to_dict()
    except ScopeError as exc:
        raise TrainError(str(exc)) from exc


def select_training_items(items: Sequence[ImageItem], run: TrainConfig) -> list[ImageItem]:
    """Normal images only (label 0), from ``train`` when the list has splits, capped if asked."""
    chosen = [it for it in items if it.label == 0 and it.split in (None, "train")]
    if run.max_images is not None and len(chosen) > run.max_images:
        rng = np.random.default_rng(run.seed)
        keep = sorted(rng.choice(len(chosen), size=run.max_images, replace=False).tolist())
        chosen = [chosen[i] for i in keep]
    return chosen


def build(model_config: ModelConfig) -> nn.Module:
    """Build the model of a ``ModelConfig`` (``model.pdd.build_model`` dispatches RD4AD too)."""
    if model_config.arch == "rd4ad":
        from model.rd4ad import build_rd4ad

        return build_rd4ad(model_config)
    from model.pdd import build_model

    return build_model(model_config)


def teacher_key(model_config: ModelConfig) -> str:
    """What fixes the teacher features of an image: the teachers and the input size."""
    cnn, mamba = model_config.cnn_teacher, model_config.mamba_teacher
    return f"{cnn!r}|{mamba!r}|{model_config.image_size}"


def _seed_everything(seed: int) -> torch.Generator:
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    return torch.Generator().manual_seed(seed)


def _save_resume(path: Path, model: nn.Module, opt: Any, sched: Any, gen: torch.Generator,
                 epoch: int, losses: list[float], run: TrainConfig) -> None:  # fmt: skip
    state = {
        "epoch": epoch,
        "losses": losses,
        "run": asdict(run),
        "head": trainable_state(model),
        "optimizer": opt.state_dict(),
        "scheduler": sched.state_dict(),
        "generator": gen.get_state(),
    }
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)  # atomic: a crash never leaves a half-written resume state


def _load_resume(path: Path, model: nn.Module, opt: Any, sched: Any, gen: torch.Generator,
                 run: TrainConfig) -> tuple[int, list[float]]:  # fmt: skip
    state = torch.load(path, map_location="cpu", weights_only=True)  # tensors and plain data only
    saved = state["run"]
    for key in ("batch_size", "lr", "t_max", "eta_min", "seed", "max_images"):
        if saved.get(key) != asdict(run).get(key):
            raise TrainError(
                f"{path.name}: cannot resume, {key} was {saved.get(key)!r}, "
                f"now {asdict(run)[key]!r}"
            )
    missing, unexpected = model.load_state_dict(state["head"], strict=False)
    missing = [k for k in missing if not k.startswith(("teacher_cnn.", "teacher_mamba."))]
    if missing or unexpected:
        raise TrainError(f"{path.name}: head keys differ (missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]})")  # fmt: skip
    opt.load_state_dict(state["optimizer"])
    sched.load_state_dict(state["scheduler"])
    gen.set_state(state["generator"])
    return int(state["epoch"]), list(state["losses"])


AUGMENT_DEGREES = 10.0
AUGMENT_TRANSLATE = 0.05
AUGMENT_SCALE = (0.9, 1.1)


def augmented_views(images: np.ndarray, views: int, seed: int) -> np.ndarray:
    """(N, S, S) images -> (N * views, S, S), image-major: row i * views + v is view v of image i.

    View 0 is the image itself; the others are a random horizontal flip (p = 0.5) followed by a
    random affine map (rotation ±10°, shift ±5 %, scale 0.9–1.1, zero fill) from torchvision,
    seeded so a run's views are reproducible.
    """
    from torchvision.transforms import v2

    augment = v2.Compose(
        [
            v2.RandomHorizontalFlip(0.5),
            v2.RandomAffine(AUGMENT_DEGREES, (AUGMENT_TRANSLATE,) * 2, AUGMENT_SCALE, fill=0.0),
        ]
    )
    x = torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32)).unsqueeze(1)  # (N,1,S,S)
    out = x.repeat_interleave(views, dim=0)  # (N * views, 1, S, S)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for row in range(out.shape[0]):
            if row % views:
                out[row] = augment(out[row])
    return out[:, 0].numpy()


def _device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _epoch(model: nn.Module, opt: Any, bank: Any, gen: torch.Generator, run: TrainConfig,
           epoch: int, progress: ProgressFn | None, lr: float) -> float:  # fmt: skip
    views = max(run.augment_views, 1)
    n = bank[0][0].shape[0] // views  # images; the bank holds `views` rows per image
    perm = torch.randperm(n, generator=gen)
    if views > 1:  # one random view of each image this epoch
        perm = perm * views + torch.randint(views, (n,), generator=gen)
    steps = (n + run.batch_size - 1) // run.batch_size
    total, seen = 0.0, 0
    model.train()
    for step in range(steps):
        idx = perm[step * run.batch_size : (step + 1) * run.batch_size]
        if idx.numel() < 2 and seen:  # a batch of one breaks batch norm; rare, and deterministic
            continue
        parts = train_step(model, opt, select(bank, idx.to(bank[0][0].device)))
        total += float(parts.total) * idx.numel()
        seen += idx.numel()
        if progress is not None:
            progress(TrainProgress(epoch, run.epochs, step + 1, steps, total / seen, lr))
    return total / max(seen, 1)


def _training_images(
    items: Sequence[ImageItem] | Path | ArchivePart, spec: PreprocessSpec, run: TrainConfig
) -> tuple[np.ndarray, list[str], list[dict[str, str]]]:
    if isinstance(items, ArchivePart):
        images, names, errors = archive_images(items.root, spec, run, items.studies)
    elif isinstance(items, (str, Path)):
        images, names, errors = archive_images(Path(items), spec, run)
    else:
        images, kept, errors = load_images(select_training_items(items, run), spec)
        names = [str(it.path) for it in kept]
    if len(names) < 2:
        raise TrainError(f"need at least 2 readable normal training images, found {len(names)}")
    return images, names, errors


def train_model(
    items: Sequence[ImageItem] | Path | ArchivePart,
    out_dir: Path,
    model_config: ModelConfig,
    run: TrainConfig = TrainConfig(),
    *,
    resume: bool = False,
    progress: ProgressFn | None = None,
    model: nn.Module | None = None,
    data_description: str = "",
    feature_cache: dict[Any, Any] | None = None,
    resize: str = "pad",
    scope: dict[str, Any] | None = None,
    framing: str | None = AUTO,
) -> TrainResult:
    """Train on the normal ``train`` images of ``items``; write a checkpoint to ``out_dir``.

    Args:
        items: labelled images (only label 0 and split ``train``/None are used), or the path
            of an archive of normal studies (DICOM/NIfTI; every slice is a training image), or
            an ``ArchivePart`` (some of its studies).
        out_dir: checkpoint folder (``config.json``, ``model.safetensors``, ``resume.pt``).
        model_config: a ``model.config.ModelConfig``.
        run: the run configuration (epochs, batch size, optimiser, seed).
        resume: continue from ``out_dir/resume.pt`` if present.
        progress: called after every step and at every epoch end.
        model: an already-built model for ``model_config`` (experiments reuse teachers).
        data_description: short, identifier-free text stored in the checkpoint.
        feature_cache: dict reused across runs to skip recomputing the same teacher features.
        resize: ``PreprocessSpec.resize`` ("pad", the product; "stretch" for experiments).
        scope: what the model knows (``ModelScope.to_dict()``); None: derived from the headers
            when ``items`` is an archive, else recorded as "unknown".
        framing: ``PreprocessSpec.framing``; "auto" (the default): the rule for the scope's
            modalities (``pdd_batch.ingest.framing.framing_for``); None or "none": no framing.

    Raises:
        TrainError: no usable training image, a resume state from a different run, or an
            unknown framing.
    """
    from model.checkpoint import save_checkpoint

    t0 = time.perf_counter()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if model is None:
        model_config = replace(model_config, head_seed=run.seed)  # --seed seeds the head too
    spec = PreprocessSpec(image_size=int(model_config.image_size), resize=resize)
    if scope is None and isinstance(items, (str, Path, ArchivePart)):
        root = items.root if isinstance(items, ArchivePart) else Path(items)
        scope = archive_scope(root, spec)
    try:
        framed = resolve_framing(framing, (scope or {}).get("modalities") or ())
    except FramingError as exc:
        raise TrainError(str(exc)) from exc
    spec = replace(spec, framing=framed)
    images, names, errors = _training_images(items, spec, run)
    gen = _seed_everything(run.seed)
    device = _device()
    model = (model if model is not None else build(model_config)).to(device)
    if progress is not None:
        progress(TrainProgress(0, run.epochs, 0, 0, float("nan"), run.lr, phase="features"))
    cache = feature_cache if feature_cache is not None else {}
    bank = _cached_bank(cache, model, model_config, images, names, run, device)
    losses = _epochs(model, bank, gen, run, out_dir / RESUME_FILE, resume, progress)
    model.eval()
    training = _training_record(data_description, names, errors, run, losses, device, t0)
    ood = _fit_ood(bank, run)
    ckpt = save_checkpoint(
        model, out_dir, preprocessing=spec.to_dict(), training=training, scope=scope, ood=ood
    )
    if progress is not None:
        last = losses[-1] if losses else float("nan")
        progress(TrainProgress(run.epochs, run.epochs, 0, 0, last, run.lr, phase="done"))
    wall = time.perf_counter() - t0
    return TrainResult(Path(ckpt), len(losses), losses, len(names), errors, wall, model)


def _training_record(
    data_description: str,
    names: list[str],
    errors: list[dict[str, str]],
    run: TrainConfig,
    losses: list[float],
    device: torch.device,
    t0: float,
) -> dict[str, Any]:
    """The ``training`` section of the checkpoint: data, counts, run, losses, device, time."""
    return {
        "data": data_description,
        "n_images": len(names),
        "n_failed": len(errors),
        "run": asdict(run),
        "epochs_run": len(losses),
        "epoch_losses": [round(v, 6) for v in losses],
        "final_loss": losses[-1] if losses else None,
        "device": device.type,
        "torch": torch.__version__,
        "wall_s": round(time.perf_counter() - t0, 2),
    }


def _fit_ood(bank: Any, run: TrainConfig) -> Any:
    """The in-distribution check on the slices (and views) the model learned; the views of one
    image form one group, so each slice is measured against the other images."""
    pooled = pool_levels(bank[0])  # (N * K, D)
    views = max(run.augment_views, 1)
    groups = torch.arange(pooled.shape[0]) // views  # bank rows are image-major
    return fit_ood(pooled, seed=run.seed, groups=groups)


def _cached_bank(
    cache: dict[Any, Any],
    model: nn.Module,
    model_config: ModelConfig,
    images: np.ndarray,
    names: list[str],
    run: TrainConfig,
    device: torch.device,
) -> Any:
    """The teacher features of ``images`` (N, S, S) (with ``run.augment_views`` > 1: of their
    N * K seeded views), computed once per teachers + images (+ views and seed) in ``cache``."""
    key: tuple[Any, ...] = (teacher_key(model_config), tuple(names))
    if run.augment_views > 1:  # the views depend on the seed
        key = (*key, run.augment_views, run.seed)
    if key not in cache:
        if run.augment_views > 1:
            images = augmented_views(images, run.augment_views, run.seed)  # (N * K, S, S)
        x = torch.from_numpy(images).unsqueeze(1).to(device)  # (N or N * K, 1, S, S)
        cache[key] = feature_bank(model, x, run.feature_batch)
    return cache[key]


def _epochs(
    model: nn.Module,
    bank: Any,
    gen: torch.Generator,
    run: TrainConfig,
    resume_path: Path,
    resume: bool,
    progress: ProgressFn | None,
) -> list[float]:
    """Train the head for ``run.epochs`` (continuing from ``resume_path`` when asked), saving the
    resume state after every epoch; returns the mean loss of every epoch run."""
    opt = make_optimizer(model.trainable_parameters(), run.lr, run.betas)
    sched = make_scheduler(opt, run.t_max, run.eta_min)
    start, losses = 0, []
    if resume and resume_path.exists():
        start, losses = _load_resume(resume_path, model, opt, sched, gen, run)
        log.info("resuming after epoch %d of %d", start, run.epochs)
    for epoch in range(start + 1, run.epochs + 1):
        lr = opt.param_groups[0]["lr"]
        losses.append(_epoch(model, opt, bank, gen, run, epoch, progress, lr))
        sched.step()
        _save_resume(resume_path, model, opt, sched, gen, epoch, losses, run)
        if progress is not None:
            progress(TrainProgress(epoch, run.epochs, 0, 0, losses[-1], lr))
    return losses


def ray_address(address: str | None) -> str | None:
    """The cluster to join: ``address`` if given, else ``RAY_ADDRESS``, else None (in-process)."""
    return address or os.environ.get("RAY_ADDRESS") or None


def run_training(
    items: Sequence[ImageItem] | Path,
    out_dir: Path,
    model_config: ModelConfig,
    run: TrainConfig = TrainConfig(),
    *,
    resume: bool = False,
    progress: ProgressFn | None = None,
    address: str | None = None,
    data_description: str = "",
    scope: dict[str, Any] | None = None,
    framing: str | None = AUTO,
) -> TrainResult:
    """Train in-process, or as one Ray actor on the cluster at ``address``/``RAY_ADDRESS``.

    On a cluster the data and ``out_dir`` paths must be visible to the worker (shared storage);
    progress is polled from the actor about once a second.
    """
    addr = ray_address(address)
    if addr is None:
        return train_model(items, out_dir, model_config, run, resume=resume, progress=progress,
                           data_description=data_description, scope=scope,
                           framing=framing)  # fmt: skip
    result = run_remote(
        train_model,
        (items if isinstance(items, Path) else list(items), Path(out_dir), model_config, run),
        {
            "resume": resume,
            "data_description": data_description,
            "scope": scope,
            "framing": framing,
        },
        address=addr,
        progress=progress,
    )
    return replace(result, model=None)


def _strip_model(fn: Callable[..., Any]) -> Callable[..., Any]:
    def call(*args: Any, **kwargs: Any) -> Any:
        result = fn(*args, **kwargs)
        return replace(result, model=None) if hasattr(result, "model") else result

    return call


def run_remote(
    fn: Callable[..., Any],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    *,
    address: str,
    progress: Callable[[Any], None] | None = None,
) -> Any:
    """Run ``fn(*args, progress=..., **kwargs)`` in one Ray actor (1 GPU if the cluster has one):
    ``run_remote_many`` with one call; the result comes back without its ``model``."""
    forward = None if progress is None else (lambda _i, report: progress(report))
    calls = [(_strip_model(fn), args, kwargs)]
    return run_remote_many(calls, address=address, progress=forward)[0]


def run_remote_many(
    calls: Sequence[tuple[Callable[..., Any], tuple[Any, ...], dict[str, Any]]],
    *,
    address: str,
    progress: Callable[[int, Any], None] | None = None,
) -> list[Any]:
    """Run each ``fn(*args, progress=..., **kwargs)`` of ``calls`` in its own Ray actor, all at
    once (1 GPU each when the cluster has one: they queue for it); ``progress(i, report)``
    forwards call ``i``'s latest report. Returns the results in the order of ``calls``."""
    import ray

    if not ray.is_initialized():
        from jobs.cluster import join

        join(address)
    gpus = 1 if ray.cluster_resources().get("GPU", 0) >= 1 else 0

    @ray.remote(max_concurrency=2)
    class _Runner:
        def __init__(self) -> None:
            self.latest: Any = None

        def run(self, call: Callable[..., Any], a: tuple[Any, ...], kw: dict[str, Any]) -> Any:
            def report(p: Any) -> None:
                self.latest = p

            return call(*a, progress=report, **kw)

        def last(self) -> Any:
            return self.latest

    actors = [_Runner.options(num_cpus=1, num_gpus=gpus).remote() for _ in calls]
    refs = [a.run.remote(fn, args, kw) for a, (fn, args, kw) in zip(actors, calls, strict=True)]
    shown: list[Any] = [None] * len(calls)
    try:
        pending = set(range(len(refs)))
        while pending:
            ray.wait([refs[i] for i in pending], timeout=1.0)
            for i in sorted(pending):
                latest = ray.get(actors[i].last.remote())
                if progress is not None and latest is not None and latest != shown[i]:
                    progress(i, latest)
                    shown[i] = latest
            pending = {i for i in pending if not ray.wait([refs[i]], timeout=0)[0]}
        return [ray.get(r) for r in refs]
    finally:
        for a in actors:
            ray.kill(a)
