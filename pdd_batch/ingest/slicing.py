"""Volumes to model input: reformat to the chosen axis, window/normalise, resize, stream.

Every slice the model sees goes through ``PreprocessSpec``: CT is windowed with the spec's preset
(HU), everything else (MR, X-ray, PET, NIfTI without a CT sidecar) is percentile-normalised over
the whole volume (so dark end slices stay dark), framed by the spec's field-of-view rule
(``pdd_batch.ingest.framing``: per volume for CT/MR, so every slice of a volume is cut alike), then
``fit_to_square`` to (S, S) float32 in [0, 1].

Orientation: volumes carry LPS directions for their array axes, DICOM and NIfTI alike, so slices
come out in the same radiological display for both: axial slices ordered inferior -> superior with
anterior at the top and patient right on the image left; coronal/sagittal with superior at the top.
Volumes with fewer than ``MIN_REFORMAT_SLICES`` slices are not reformatted to another axis (their
acquired plane is used, with a warning). Non-square pixels are resampled to square first.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
from PIL import Image

from pdd_batch.ingest.framing import Framer
from pdd_batch.ingest.preprocess import WINDOW_PRESETS, PreprocessSpec, to_model_square, window_ct
from pdd_batch.ingest.volume import LoadedSeries, Volume

log = logging.getLogger(__name__)
MIN_REFORMAT_SLICES = 16
ACQUIRED_PLANE = ("sagittal", "coronal", "axial")  # by the dominant LPS axis of the normal
PERCENTILE_SAMPLE = 2_000_000  # voxels sampled for volume percentiles
ASPECT_TOL = 0.05
MAX_ASPECT = 20.0  # beyond this pixel aspect the spacing is not trusted
# axis -> (LPS axis, wanted sign) for (slice order, image rows, image columns)
DISPLAY = {
    "axial": ((2, 1.0), (1, 1.0), (0, 1.0)),
    "coronal": ((1, 1.0), (2, -1.0), (0, 1.0)),
    "sagittal": ((0, 1.0), (2, -1.0), (1, 1.0)),
}


@dataclass(frozen=True)
class ModelSlice:
    """One model input.

    Attributes:
        volume_index: index into ``LoadedSeries.volumes``.
        slice_index: index along the chosen axis in display order.
        source_file: relative path of the file the slice came from (for a slice reformatted
            across files: the first file of the volume).
        image: float32 (S, S) in [0, 1].
        window: "brain"/"subdural"/"bone" for CT, "percentile" otherwise.
    """

    volume_index: int
    slice_index: int
    source_file: str
    image: np.ndarray  # (S, S) float32
    window: str = ""


def window_name(modality: str, spec: PreprocessSpec) -> str:
    """The intensity mapping used for a modality under ``spec``."""
    return spec.ct_window if modality.upper() == "CT" else "percentile"


def display_axes(
    directions: np.ndarray, axis: str
) -> tuple[tuple[int, int, int], tuple[bool, ...]]:
    """Array-axis permutation and flips that put a volume in display order for ``axis``.

    Args:
        directions: (3, 3) LPS unit vectors of the array axes.
        axis: "axial", "coronal" or "sagittal".

    Returns:
        (perm, flips): ``np.transpose(data, perm)`` then flip the axes where ``flips`` is True.
    """
    remaining = [0, 1, 2]
    perm, flips = [], []
    for lps_axis, sign in DISPLAY[axis]:
        best = max(remaining, key=lambda a: abs(directions[a, lps_axis]))
        remaining.remove(best)
        perm.append(best)
        flips.append(bool(directions[best, lps_axis] * sign < 0))
    return (perm[0], perm[1], perm[2]), tuple(flips)


def reorient(
    volume: Volume, axis: str
) -> tuple[np.ndarray, tuple[float, float, float], np.ndarray | None, str]:
    """A view of the volume in display order for ``axis``.

    Returns:
        (data (N, H, W) view, spacing (slice, row, col), source slice index per output slice
        (None when slices are reformatted across source slices), warning or "").
    """
    n = volume.data.shape[0]
    if volume.directions is None:
        return volume.data, volume.spacing, np.arange(n), ""
    perm, flips = display_axes(volume.directions, axis)
    warning = ""
    if perm[0] != 0 and n < MIN_REFORMAT_SLICES:
        warning = f"too few slices ({n}) to reformat to {axis}; acquired plane used"
        perm, flips = _in_plane_only(volume.directions)
    data = np.transpose(volume.data, perm)
    for i, flip in enumerate(flips):
        if flip:
            data = np.flip(data, axis=i)
    spacing = (volume.spacing[perm[0]], volume.spacing[perm[1]], volume.spacing[perm[2]])
    if perm[0] != 0:
        return data, spacing, None, warning
    index = np.arange(n)[::-1] if flips[0] else np.arange(n)
    return data, spacing, index, warning


def _in_plane_only(directions: np.ndarray) -> tuple[tuple[int, int, int], tuple[bool, ...]]:
    """Keep slices along array axis 0, shown in the display convention of the acquired plane."""
    acquired = ACQUIRED_PLANE[int(np.argmax(np.abs(directions[0])))]
    perm, flips = display_axes(directions, acquired)
    if perm[0] != 0:  # strongly oblique: keep the stored layout
        return (0, 1, 2), (False, False, False)
    return perm, flips


def _square_pixels(img: np.ndarray, row_mm: float, col_mm: float) -> np.ndarray:
    """Resample rows so pixels are square (bilinear); unchanged when already square, unknown or
    implausible (a damaged header must not blow the image up)."""
    if not (np.isfinite(row_mm) and np.isfinite(col_mm)) or row_mm <= 0 or col_mm <= 0:
        return img
    ratio = row_mm / col_mm
    if abs(ratio - 1.0) <= ASPECT_TOL or not 1.0 / MAX_ASPECT <= ratio <= MAX_ASPECT:
        return img
    new_h = max(1, int(round(img.shape[0] * ratio)))
    resized = Image.fromarray(np.ascontiguousarray(img, dtype=np.float32)).resize(
        (img.shape[1], new_h), Image.BILINEAR
    )
    return np.asarray(resized, dtype=np.float32)


def _volume_range(data: np.ndarray, spec: PreprocessSpec) -> tuple[float, float]:
    """Percentile (lo, hi) over the volume (finite voxels, sampled when large)."""
    flat = data.reshape(-1)
    step = max(1, flat.size // PERCENTILE_SAMPLE)
    sample = flat[::step]
    sample = sample[np.isfinite(sample)]
    if sample.size == 0:
        return 0.0, 0.0
    lo, hi = np.percentile(sample, list(spec.percentiles))
    return float(lo), float(hi)


def _to_unit(
    img: np.ndarray, modality: str, spec: PreprocessSpec, rng: tuple[float, float]
) -> np.ndarray:
    if modality.upper() == "CT":
        out = window_ct(img, *WINDOW_PRESETS[spec.ct_window])
    else:
        lo, hi = rng
        if hi <= lo:
            return np.zeros(img.shape, dtype=np.float32)
        out = (img.astype(np.float32) - np.float32(lo)) / np.float32(hi - lo)
        out = np.clip(out, 0.0, 1.0, out=out)
    return np.nan_to_num(out, nan=0.0, posinf=1.0, neginf=0.0)


def iter_model_slices(series: LoadedSeries, spec: PreprocessSpec) -> Iterator[ModelSlice]:
    """Stream model inputs of one decoded series, volume by volume, slice by slice.

    Args:
        series: from ``load_series``.
        spec: the preprocessing recorded in the checkpoint.

    Yields:
        ``ModelSlice`` with image float32 (S, S) in [0, 1].
    """
    window = window_name(series.modality, spec)
    for v_index, volume in enumerate(series.volumes):
        data, spacing, source_index, warning = reorient(volume, spec.axis)
        if warning and warning not in series.warnings:
            series.warnings.append(warning)
        rng = _volume_range(volume.data, spec) if window == "percentile" else (0.0, 0.0)
        framer = Framer(
            spec.framing,
            lambda i, d=data, r=rng: _to_unit(d[i], series.modality, spec, r),  # (H, W)
            data.shape[0],
            (spacing[1], spacing[2]),
        )
        for s_index in range(data.shape[0]):
            img = _to_unit(data[s_index], series.modality, spec, rng)  # (H, W)
            img = framer.apply(s_index, img)  # (h, w): the spec's field of view
            img = _square_pixels(img, spacing[1], spacing[2])
            src = 0 if source_index is None else int(source_index[s_index])
            source = volume.source_files[src]
            yield ModelSlice(
                volume_index=v_index,
                slice_index=s_index,
                source_file=source,
                image=to_model_square(img, spec),
                window=window,
            )
