"""Compact PNG encoding of anomaly maps for the ``slices`` table.

A map (H, W) float32 >= 0 is stored as an 8-bit greyscale PNG scaled by its own maximum
(``heatmap_max``), so ``decode_heatmap(png, max)`` recovers it to within ``max / 255 / 2``.
Smooth anomaly maps compress to a few kilobytes each, which keeps the hot rows small.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image


class HeatmapError(ValueError):
    """A map or PNG that cannot be encoded or decoded."""


def quantise_map(amap: np.ndarray) -> tuple[np.ndarray, float]:
    """Scale a (H, W) map to uint8 by its maximum; returns (uint8 (H, W), max)."""
    if amap.ndim != 2:
        raise HeatmapError(f"anomaly map must be (H, W), got shape {amap.shape}")
    amap = np.nan_to_num(amap.astype(np.float32, copy=False), nan=0.0, posinf=0.0, neginf=0.0)
    amap = np.clip(amap, 0.0, None)
    peak = float(amap.max()) if amap.size else 0.0
    if peak <= 0.0:
        return np.zeros(amap.shape, dtype=np.uint8), 0.0
    q = np.rint(amap * (255.0 / peak))
    return q.astype(np.uint8), peak


def encode_png(q: np.ndarray) -> bytes:
    """Encode a uint8 (H, W) array as a greyscale PNG."""
    if q.dtype != np.uint8 or q.ndim != 2:
        raise HeatmapError(f"expected uint8 (H, W), got {q.dtype} {q.shape}")
    buf = io.BytesIO()
    Image.fromarray(q, mode="L").save(buf, format="PNG", optimize=False, compress_level=6)
    return buf.getvalue()


def encode_heatmap(amap: np.ndarray) -> tuple[bytes, float]:
    """(H, W) float map -> (PNG bytes, heatmap_max)."""
    q, peak = quantise_map(amap)
    return encode_png(q), peak


def decode_heatmap(png: bytes, heatmap_max: float) -> np.ndarray:
    """PNG bytes + scale -> float32 (H, W) map."""
    try:
        with Image.open(io.BytesIO(png)) as im:
            q = np.asarray(im.convert("L"), dtype=np.float32)
    except OSError as exc:
        raise HeatmapError(f"cannot decode heatmap PNG ({exc})") from exc
    return q * np.float32(heatmap_max / 255.0)
