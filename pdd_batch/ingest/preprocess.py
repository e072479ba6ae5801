"""Preprocessing contract shared by training, evaluation and screening.

The model sees images as float32 arrays in [0, 1], shape (S, S), single channel (the model
replicates the channel and applies ImageNet normalisation itself). Whatever produces that
array (a PNG on disk, a windowed CT slice, a percentile-normalised MR slice) goes through
``fit_to_square`` so every source is resized the same way. The spec is stored in every
checkpoint so screening reproduces the distribution the model was trained on.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from pdd_batch.ingest.framing import FramingError, check_framing, frame_image

# CT window presets: name -> (centre, width) in Hounsfield units.
WINDOW_PRESETS: dict[str, tuple[float, float]] = {
    "brain": (40.0, 80.0),
    "subdural": (75.0, 215.0),
    "bone": (600.0, 2800.0),
}


class PreprocessError(ValueError):
    """A preprocessing spec or input that cannot be used; the message names the key or file."""


@dataclass(frozen=True)
class PreprocessSpec:
    """How a source image becomes model input.

    Attributes:
        image_size: side S of the square model input.
        ct_window: CT preset name from ``WINDOW_PRESETS`` used for CT series.
        percentiles: (low, high) percentiles for MR / X-ray / other modalities.
        axis: slicing axis for volumes ("axial", "coronal" or "sagittal").
        resize: how an image becomes square: "pad" (the product: zero-pad, then resize) or
            "stretch" (an experiment selection round 3 rejected; kept so its runs reproduce).
        framing: field-of-view normalisation applied before the resize, a name of
            ``pdd_batch.ingest.framing.FRAMINGS`` ("ct-head-v1", "radiograph-v1", "mr-v1"), or
            None (checkpoints written before it: the whole image, as they were trained).
    """

    image_size: int = 256
    ct_window: str = "brain"
    percentiles: tuple[float, float] = (0.5, 99.5)
    axis: str = "axial"
    extra: dict[str, Any] = field(default_factory=dict)
    resize: str = "pad"
    framing: str | None = None

    def __post_init__(self) -> None:
        if not 16 <= int(self.image_size) <= 4096:
            raise PreprocessError(
                f"preprocessing.image_size must be in 16..4096, got {self.image_size}"
            )
        if self.ct_window not in WINDOW_PRESETS:
            raise PreprocessError(
                f"preprocessing.ct_window must be one of {sorted(WINDOW_PRESETS)}, "
                f"got {self.ct_window!r}"
            )
        lo, hi = self.percentiles
        if not 0.0 <= lo < hi <= 100.0:
            raise PreprocessError(
                f"preprocessing.percentiles must satisfy 0<=lo<hi<=100, got {self.percentiles}"
            )
        if self.axis not in ("axial", "coronal", "sagittal"):
            raise PreprocessError(
                f"preprocessing.axis must be axial/coronal/sagittal, got {self.axis!r}"
            )
        if self.resize not in RESIZES:
            raise PreprocessError(
                f"preprocessing.resize must be one of {sorted(RESIZES)}, got {self.resize!r}"
            )
        try:
            check_framing(self.framing)
        except FramingError as exc:
            raise PreprocessError(f"preprocessing.{exc}") from exc

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["percentiles"] = list(self.percentiles)
        if self.resize == "pad":
            del d["resize"]  # the default is implied, so checkpoints written before stay identical
        if self.framing is None:
            del d["framing"]  # likewise: no framing is what every earlier checkpoint did
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PreprocessSpec:
        known = {"image_size", "ct_window", "percentiles", "axis", "extra", "resize", "framing"}
        unknown = set(d) - known
        if unknown:
            raise PreprocessError(f"unknown preprocessing keys: {sorted(unknown)}")
        kw = dict(d)
        if "percentiles" in kw:
            kw["percentiles"] = tuple(float(v) for v in kw["percentiles"])
        return cls(**kw)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)


def window_ct(hu: np.ndarray, centre: float, width: float) -> np.ndarray:
    """Linear CT window: HU -> [0, 1] (float32), clipped."""
    lo = centre - width / 2.0
    out = (hu.astype(np.float32) - np.float32(lo)) / np.float32(width)
    return np.clip(out, 0.0, 1.0, out=out)


def normalise_percentile(x: np.ndarray, lo_pct: float, hi_pct: float) -> np.ndarray:
    """Percentile normalisation to [0, 1] (float32); a constant image maps to zeros."""
    x = x.astype(np.float32, copy=False)
    lo, hi = np.percentile(x, [lo_pct, hi_pct])
    if not np.isfinite(lo) or not np.isfinite(hi) or hi <= lo:
        return np.zeros_like(x, dtype=np.float32)
    out = (x - np.float32(lo)) / np.float32(hi - lo)
    return np.clip(out, 0.0, 1.0, out=out)


def fit_to_square(img: np.ndarray, size: int) -> np.ndarray:
    """Zero-pad a (H, W) image in [0, 1] to a centred square, then resize bilinearly to (S, S).

    Padding (rather than stretching) keeps anatomy proportions identical for every source size.
    """
    if img.ndim != 2:
        raise PreprocessError(f"fit_to_square expects a (H, W) image, got shape {img.shape}")
    h, w = img.shape
    side = max(h, w)
    canvas = np.zeros((side, side), dtype=np.float32)
    top, left = (side - h) // 2, (side - w) // 2
    canvas[top : top + h, left : left + w] = img
    if side == size:
        return canvas
    resized = Image.fromarray(canvas).resize((size, size), Image.BILINEAR)
    return np.clip(np.asarray(resized, dtype=np.float32), 0.0, 1.0)


def stretch_to_square(img: np.ndarray, size: int) -> np.ndarray:
    """(H, W) in [0, 1] -> (S, S) by a bilinear resize that ignores the aspect ratio."""
    if img.ndim != 2:
        raise PreprocessError(f"stretch_to_square expects a (H, W) image, got shape {img.shape}")
    resized = Image.fromarray(img.astype(np.float32)).resize((size, size), Image.BILINEAR)
    return np.clip(np.asarray(resized, dtype=np.float32), 0.0, 1.0)


RESIZES = {"pad": fit_to_square, "stretch": stretch_to_square}


def to_model_square(img: np.ndarray, spec: PreprocessSpec) -> np.ndarray:
    """(H, W) in [0, 1] -> (S, S) model input, the way ``spec.resize`` says."""
    return RESIZES[spec.resize](img, spec.image_size)


def load_image_file(path: Path, spec: PreprocessSpec) -> np.ndarray:
    """Read a PNG/JPEG (any mode, RGBA too) as grayscale model input, float32 (S, S) in [0, 1].

    16-bit greyscale PNGs (PIL modes "I;16*"/"I") are scaled from their full 16-bit range;
    ``convert("L")`` would clip them at 255. The file's grey levels are taken as model-domain
    values (a slice exported through the spec's window or percentiles), framed by
    ``spec.framing`` as a volume of one slice with square pixels, then padded and resized.
    """
    try:
        with Image.open(path) as im:
            if im.mode.startswith("I;16") or im.mode == "I":
                wide = np.asarray(im, dtype=np.float32) / 65535.0
                gray = np.clip(wide, 0.0, 1.0)
            else:
                gray = np.asarray(im.convert("L"), dtype=np.float32) / 255.0
    except (OSError, ValueError) as exc:
        raise PreprocessError(f"{path.name}: cannot read image ({exc})") from exc
    return to_model_square(frame_image(gray, spec.framing), spec)
