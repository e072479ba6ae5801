"""The scoring actor (one PDD model per actor, weights loaded once) and the heatmap encoder.

``SlicePredictor`` is called by Ray Data on batches of read-task rows (numpy columns); slice rows
are scored in one ``model.predict`` call and get ``score``, ``heatmap_max`` and the quantised map
``heatmap_u8``; marker rows (failed/empty series) pass through unscored. The image column is
dropped. ``encode_heatmaps_fn``, a CPU stage after the actors, turns ``heatmap_u8`` into
``heatmap_png``: PNG encoding costs ≈ 5 ms of CPU per 256² map, which on a GPU actor's one CPU
capped the pipeline at ≈ 125 slices/s (H200, docs/benchmarks.md); as read tasks do, it runs on
every free CPU.
"""

from __future__ import annotations

import logging
import os
import resource
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from jobs.read_task import crash_once
from model.checkpoint import load_checkpoint
from model.ood import capture_teacher
from model.precision import check_precision
from pdd_batch.runs.heatmap import encode_png
from pdd_batch.runs.rows import KIND_SLICE

log = logging.getLogger(__name__)


class SlicePredictor:
    """Ray Data actor class (``map_batches(SlicePredictor, ...)``).

    Args:
        checkpoint: checkpoint folder (``model.checkpoint`` format).
        device: ``"cuda"`` or ``"cpu"``.
        torch_threads: intra-op threads on CPU (the CPUs reserved for this actor).
        precision: ``"fp32"`` or ``"bf16"`` for the network forward (``model.precision``).
        teacher_weights: where the checkpoint's file-sourced teacher weights are now, by role
            (``{"cnn": PATH}``; ``None``: where it recorded them); sha256 still verified.
        crash_once_marker: fault injection for tests: when set, the actor process exits hard on
            its second batch unless this file exists (creating it first), so Ray must restart the
            actor and retry the batch. Never set in production.
    """

    def __init__(
        self,
        checkpoint: str,
        device: str = "cpu",
        torch_threads: int = 1,
        crash_once_marker: str | None = None,
        precision: str = "fp32",
        teacher_weights: dict[str, str] | None = None,
    ) -> None:
        t0 = time.perf_counter()
        if device == "cpu":
            torch.set_num_threads(max(1, int(torch_threads)))
        self.device = torch.device(device)
        self.precision = check_precision(precision)
        loaded = load_checkpoint(
            Path(checkpoint), device=str(self.device), teacher_weights=teacher_weights
        )
        self.model = loaded.model.eval()
        self.checkpoint_hash = loaded.checkpoint_hash
        self.model_id = loaded.model_id
        self.ood = loaded.ood  # the in-distribution check, or None
        self.crash_once_marker = crash_once_marker
        self.batches = 0
        self.load_seconds = time.perf_counter() - t0
        log.info(
            "model %s loaded on %s (%s) in %.1fs",
            loaded.model_id,
            device,
            self.precision,
            self.load_seconds,
        )

    def _maybe_crash(self) -> None:
        if self.batches >= 2:
            crash_once(self.crash_once_marker)

    @torch.inference_mode()
    def score(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(N, S, S) float32 in [0, 1] -> scores (N,), uint8 maps (N, H, W), map maxima (N,),
        distances to the training set (N,; NaN without an in-distribution check)."""
        x = torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32))
        x = x.unsqueeze(1).to(self.device, non_blocking=True)  # (N, 1, S, S)
        dist = np.full(x.shape[0], np.nan, dtype=np.float32)
        if self.ood is None:
            out = self.model.predict(x, precision=self.precision)
        else:
            # the teacher's own pass, hooked: no second forward
            with capture_teacher(self.model, self.ood.levels) as pooled:
                out = self.model.predict(x, precision=self.precision)
            dist = self.ood.distance(torch.cat(pooled)).float().cpu().numpy()  # (N,)
        maps = torch.clamp(torch.nan_to_num(out.maps.float(), nan=0.0), min=0.0)  # (N, H, W)
        peak = maps.flatten(1).amax(dim=1)  # (N,)
        scale = torch.where(peak > 0, 255.0 / peak, torch.zeros_like(peak))
        q = torch.round(maps * scale[:, None, None]).to(torch.uint8)  # (N, H, W)
        return out.scores.float().cpu().numpy(), q.cpu().numpy(), peak.cpu().numpy(), dist

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        self.batches += 1
        self._maybe_crash()
        kind = np.asarray(batch["kind"])
        is_slice = kind == KIND_SLICE
        n = len(kind)
        scores = np.full(n, np.nan, dtype=np.float32)
        peaks = np.zeros(n, dtype=np.float32)
        dists = np.full(n, np.nan, dtype=np.float32)
        maps = np.zeros((n, *batch["image"].shape[1:]), dtype=np.uint8)  # (N, S, S)
        if is_slice.any():
            s, q, p, d = self.score(batch["image"][is_slice])
            scores[is_slice], maps[is_slice], peaks[is_slice], dists[is_slice] = s, q, p, d
        out = {k: v for k, v in batch.items() if k != "image"}
        out.update(score=scores, heatmap_u8=maps, heatmap_max=peaks, ood_distance=dists)
        out["model_id"] = np.full(n, self.model_id, dtype=object)  # routes rows to provenance
        # Peak resident memory of this actor process (MiB; Linux reports KiB), for the manifest.
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
        out.update(
            actor_pid=np.full(n, os.getpid(), dtype=np.int64),
            actor_peak_rss_mb=np.full(n, rss, dtype=np.float32),
        )
        return out


def encode_heatmaps_fn(batch: dict[str, np.ndarray]) -> dict[str, Any]:
    """Ray Data CPU stage: ``heatmap_u8`` (N, S, S) -> ``heatmap_png`` (b"" for marker rows)."""
    is_slice = np.asarray(batch["kind"]) == KIND_SLICE
    maps = batch["heatmap_u8"]
    pngs = np.array(
        [encode_png(m) if ok else b"" for m, ok in zip(maps, is_slice, strict=True)], dtype=object
    )
    out = {k: v for k, v in batch.items() if k != "heatmap_u8"}
    out["heatmap_png"] = pngs
    return out
