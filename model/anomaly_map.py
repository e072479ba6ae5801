"""Anomaly map and image score from the PDD head's output (PDD_SPEC §3), in pure torch.

For each student S_k (k = 2, 1) and level l: M = 1 − cosine over channels between S_k^l and the
target f_b^l, bilinearly resized (align_corners=True) to the input size; the six maps are summed
in float64, blurred with a Gaussian equal to ``scipy.ndimage.gaussian_filter(sigma, mode="reflect",
truncate=4.0)``, and the image score is the maximum of the blurred map.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from model.outputs import AnomalyOutput, HeadOutput


def level_maps(out: HeadOutput, image_size: int) -> Tensor:
    """The six per-level maps, students 2 then 1, each level high-res first.

    Args:
        out: head output (B, C_l, H_l, W_l) per level.
        image_size: side of the square output maps.

    Returns:
        (B, 6 (= 2·levels), S, S) float32: 1 − cosine over channels, upsampled.
    """
    if not isinstance(image_size, int) or image_size < 1:
        raise ValueError(f"anomaly map image_size must be a positive int, got {image_size!r}")
    maps = []
    for student in (out.student2, out.student1):
        if len(student) != len(out.targets):
            raise ValueError(
                f"anomaly map: {len(student)} student levels vs {len(out.targets)} targets"
            )
        for s, t in zip(student, out.targets, strict=True):
            m = 1 - F.cosine_similarity(s.float(), t.float(), dim=1)  # (B, H_l, W_l)
            m = F.interpolate(
                m.unsqueeze(1), size=(image_size, image_size), mode="bilinear", align_corners=True
            )  # (B, 1, S, S)
            maps.append(m)
    return torch.cat(maps, dim=1)


def gaussian_kernel1d(sigma: float, truncate: float = 4.0, device=None) -> Tensor:
    """scipy's normalised 1-D Gaussian (radius ``int(truncate·sigma + 0.5)``), float64."""
    radius = int(truncate * sigma + 0.5)
    x = torch.arange(-radius, radius + 1, dtype=torch.float64, device=device)
    k = torch.exp(-0.5 / (sigma * sigma) * x * x)
    return k / k.sum()


def _reflect_index(n: int, radius: int, device) -> Tensor:
    """Indices of a length-n axis padded by ``radius`` with half-sample symmetric reflection
    (scipy "reflect": d c b a | a b c d | d c b a), valid for any radius."""
    idx = torch.arange(-radius, n + radius, device=device) % (2 * n)
    return torch.where(idx >= n, 2 * n - 1 - idx, idx)


def gaussian_blur(maps: Tensor, sigma: float = 4.0, truncate: float = 4.0) -> Tensor:
    """Blur (B, H, W) maps along H and W like ``scipy.ndimage.gaussian_filter`` (mode reflect).

    Computed in float64 on the maps' device; returns float64.
    """
    if maps.dim() != 3:
        raise ValueError(f"gaussian_blur expects (B, H, W), got {tuple(maps.shape)}")
    out = maps.to(torch.float64)
    if sigma <= 0:
        return out
    k = gaussian_kernel1d(sigma, truncate, device=out.device)
    radius = (k.numel() - 1) // 2
    weight = k.flip(0).view(1, 1, -1)  # correlate1d uses the reversed kernel (symmetric anyway)
    for dim in (1, 2):
        n = out.shape[dim]
        padded = out.index_select(dim, _reflect_index(n, radius, out.device))
        moved = padded.movedim(dim, -1)  # (B, other, n + 2r)
        shape = moved.shape
        res = F.conv1d(moved.reshape(-1, 1, shape[-1]), weight)  # (B·other, 1, n)
        out = res.reshape(*shape[:-1], n).movedim(-1, dim)
    return out


def anomaly_map(out: HeadOutput, image_size: int, sigma: float = 4.0) -> AnomalyOutput:
    """Blurred anomaly maps and image scores for a batch.

    Args:
        out: head output of the batch.
        image_size: side of the square input image.
        sigma: Gaussian blur sigma in pixels (scipy truncate 4, mode reflect).

    Returns:
        AnomalyOutput(maps (B, S, S) float32, scores (B,) float32), on the tensors' device.
    """
    levels = level_maps(out, image_size).to(torch.float64)  # (B, 2L, S, S)
    n = len(out.targets)
    raw = levels[:, :n].sum(dim=1) + levels[:, n:].sum(dim=1)  # (B, S, S) student 2 + student 1
    blurred = gaussian_blur(raw, sigma)  # (B, S, S) float64
    scores = blurred.amax(dim=(1, 2))  # (B,)
    return AnomalyOutput(maps=blurred.float(), scores=scores.float())
