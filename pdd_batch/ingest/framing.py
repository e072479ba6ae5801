"""Field-of-view normalisation ("framing"): what part of an image the model sees.

A checkpoint names its framing in ``PreprocessSpec.framing``; ``train``, ``calibrate``, ``evaluate``
and ``screen`` apply it identically. Every rule works on the **model-domain** image, i.e. after the
spec's intensity mapping (CT window, or percentiles) has put values in [0, 1]; so an image folder
PNG exported from a DICOM slice through that mapping is framed exactly like the slice itself.

Rules (version names are stored in checkpoints; a changed rule gets a new name):

* ``ct-head-v1`` (per volume): foreground = model value above ``CT_FOREGROUND`` (0.2: 16 HU in
  the brain window 40/80; the window cannot show anything below 0 HU, so -300 HU is not visible
  to a PNG, and screenshot PNGs carry grey backgrounds up to 0.12), holes filled slice by slice,
  the largest 3D connected component kept (the table and the head holder are separate
  components), everything else set to air (0); every slice is cut to the component's bounding
  box over all slices, widened by ``MARGIN`` of its longer side (in mm) on every side.
* ``mr-v1`` (per volume): foreground = value above ``MR_FOREGROUND`` (a tenth of the 0.5-99.5
  percentile range), same component and bounding box, nothing set to zero (MR noise is part of
  the image the model learns).
* ``radiograph-v1`` (per image): edge rows/columns that are near-constant (95th - 5th percentile
  at most ``BORDER_SPREAD``) are cut away, from each side inwards, at most ``MAX_BORDER`` of the
  image per side: uniform borders, burned-in frames and collimation.

The caller then pads the cut image to a centred square and resizes it (``fit_to_square``). A
volume with no foreground is left as it is. Pure numpy/scipy.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

FRAMINGS = ("ct-head-v1", "radiograph-v1", "mr-v1")
CT_FOREGROUND = 0.2
MR_FOREGROUND = 0.1
MARGIN = 0.05
BORDER_SPREAD = 0.05
MAX_BORDER = 0.25
MAX_LABEL_VOXELS = 2**25  # larger volumes find their component on a strided grid


class FramingError(ValueError):
    """An unknown framing name (the message names it and the known ones)."""


def check_framing(name: str | None) -> None:
    """Raise ``FramingError`` unless ``name`` is None or one of ``FRAMINGS``."""
    if name is not None and name not in FRAMINGS:
        raise FramingError(f"framing must be one of {list(FRAMINGS)} or none, got {name!r}")


@dataclass(frozen=True)
class Frame:
    """Where one volume's slices are cut.

    Attributes:
        rows: (start, stop) rows of the cut; may reach outside the image (filled with 0).
        cols: (start, stop) columns of the cut, likewise.
        keep: (N, H, W) bool, voxels kept (others become 0), or None to keep every voxel.
    """

    rows: tuple[int, int]
    cols: tuple[int, int]
    keep: np.ndarray | None = None

    def apply(self, index: int, img: np.ndarray) -> np.ndarray:
        """Slice ``index`` of the volume, (H, W) in [0, 1] -> the cut (h, w) float32."""
        if self.keep is not None:
            img = np.where(self.keep[index], img, np.float32(0.0)).astype(np.float32)
        return cut(img, self.rows, self.cols)


def cut(img: np.ndarray, rows: tuple[int, int], cols: tuple[int, int]) -> np.ndarray:
    """img[r0:r1, c0:c1] where the window may reach outside the image (zeros there)."""
    (r0, r1), (c0, c1) = rows, cols
    h, w = img.shape
    out = np.zeros((r1 - r0, c1 - c0), dtype=np.float32)  # (h', w')
    sr0, sr1, sc0, sc1 = max(r0, 0), min(r1, h), max(c0, 0), min(c1, w)
    if sr1 > sr0 and sc1 > sc0:
        out[sr0 - r0 : sr1 - r0, sc0 - c0 : sc1 - c0] = img[sr0:sr1, sc0:sc1]
    return out


IN_PLANE = np.zeros((3, 3, 3), dtype=bool)
IN_PLANE[1] = ndimage.generate_binary_structure(2, 1)  # 4-connected within a slice only


def _filled(mask: np.ndarray) -> np.ndarray:
    """(N, H, W) mask with its holes filled slice by slice: background regions of a slice that
    do not reach that slice's edge (a 3D fill would leave the first and last slices open)."""
    labels, count = ndimage.label(~mask, structure=IN_PLANE)
    outside = np.zeros(count + 1, dtype=bool)
    for edge in (labels[:, 0, :], labels[:, -1, :], labels[:, :, 0], labels[:, :, -1]):
        outside[edge] = True
    outside[0] = True  # label 0: the mask itself
    return mask | ~outside[labels]


def largest_component(mask: np.ndarray) -> np.ndarray | None:
    """The largest 6-connected component of a (N, H, W) mask, or None when it is empty.

    Volumes over ``MAX_LABEL_VOXELS`` are labelled on a strided grid; the component is mapped back
    (its grid cell, widened by one cell in every direction) and intersected with the
    full-resolution mask.
    """
    n, h, w = mask.shape
    stride = max(1, int(np.ceil((mask.size / MAX_LABEL_VOXELS) ** (1.0 / 3.0))))
    grid = mask[::stride, ::stride, ::stride]
    labels, count = ndimage.label(grid)
    if count == 0:
        return None
    sizes = ndimage.histogram(labels, 1, count, count)
    component = labels == (int(np.argmax(sizes)) + 1)
    if stride == 1:
        return component
    component = ndimage.binary_dilation(component, structure=np.ones((3, 3, 3), dtype=bool))
    zi, ri, ci = (np.minimum(np.arange(k) // stride, g - 1) for k, g in
                  zip((n, h, w), component.shape, strict=True))  # fmt: skip
    return mask & component[np.ix_(zi, ri, ci)]  # (N, H, W)


def _bbox(keep: np.ndarray) -> tuple[int, int, int, int]:
    """(r0, r1, c0, c1) of the union over slices of a (N, H, W) mask (not empty)."""
    rows = np.flatnonzero(keep.any(axis=(0, 2)))
    cols = np.flatnonzero(keep.any(axis=(0, 1)))
    return int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1


def _with_margin(
    box: tuple[int, int, int, int], spacing: tuple[float, float]
) -> tuple[tuple[int, int], tuple[int, int]]:
    """The box widened by ``MARGIN`` of its longer side in mm (rows and columns alike)."""
    r0, r1, c0, c1 = box
    row_mm, col_mm = (s if np.isfinite(s) and s > 0 else 1.0 for s in spacing)
    margin_mm = MARGIN * max((r1 - r0) * row_mm, (c1 - c0) * col_mm)
    dr, dc = int(round(margin_mm / row_mm)), int(round(margin_mm / col_mm))
    return (r0 - dr, r1 + dr), (c0 - dc, c1 + dc)


def plan_volume(
    foreground: np.ndarray, spacing: tuple[float, float], zero_outside: bool
) -> Frame | None:
    """The frame of a volume from its (N, H, W) foreground mask; None when it has none.

    Args:
        foreground: model value above the rule's threshold, (N, H, W) bool.
        spacing: (row, column) pixel size in mm (unknown: non-positive or NaN, taken as 1).
        zero_outside: set voxels outside the kept component to 0 (CT: air).
    """
    keep = largest_component(_filled(foreground))
    if keep is None:
        return None
    rows, cols = _with_margin(_bbox(keep), spacing)
    return Frame(rows, cols, keep if zero_outside else None)


def _border(lines: np.ndarray, done: int, full: int) -> int:
    """How many leading lines (rows of ``lines``, (L, K)) are near-constant, so that with the
    ``done`` lines cut before, at most ``MAX_BORDER`` of ``full`` lines go from this side."""
    cap = min(int(MAX_BORDER * full) - done, lines.shape[0] // 2)
    if cap <= 0 or lines.shape[1] == 0:
        return 0
    spread = np.percentile(lines[:cap], 95, axis=1) - np.percentile(lines[:cap], 5, axis=1)
    varied = np.flatnonzero(spread > BORDER_SPREAD)
    return int(varied[0]) if varied.size else cap


def plan_radiograph(img: np.ndarray) -> Frame:
    """The frame of one radiograph (H, W) in [0, 1]: its near-constant edge lines cut away.

    Repeated until nothing more is cut, since borders cross at the corners (a row of the top
    border holds the ends of the left and right borders), each side at most ``MAX_BORDER`` of
    the image in all.
    """
    h, w = img.shape
    r0, r1, c0, c1 = 0, h, 0, w
    for _ in range(4):
        part = img[r0:r1, c0:c1]
        top, bottom = _border(part, r0, h), _border(part[::-1], h - r1, h)
        left, right = _border(part.T, c0, w), _border(part.T[::-1], w - c1, w)
        if not top + bottom + left + right:
            break
        r0, r1, c0, c1 = r0 + top, r1 - bottom, c0 + left, c1 - right
    return Frame((r0, r1), (c0, c1))


class Framer:
    """Applies one framing rule to the slices of one volume (``apply(index, img)``)."""

    def __init__(
        self,
        name: str | None,
        unit_slice: Callable[[int], np.ndarray],
        n_slices: int,
        spacing: tuple[float, float] = (1.0, 1.0),
    ) -> None:
        """Plan the frame of a volume.

        Args:
            name: a name of ``FRAMINGS``, or None (every slice passes unchanged).
            unit_slice: slice index -> that slice's model-domain image (H, W) in [0, 1].
            n_slices: slices in the volume.
            spacing: (row, column) pixel size in mm.
        """
        check_framing(name)
        self.name = name
        self.frame: Frame | None = None
        if name in ("ct-head-v1", "mr-v1") and n_slices > 0:
            level = CT_FOREGROUND if name == "ct-head-v1" else MR_FOREGROUND
            foreground = np.stack([unit_slice(i) > level for i in range(n_slices)])  # (N, H, W)
            self.frame = plan_volume(foreground, spacing, zero_outside=name == "ct-head-v1")

    def apply(self, index: int, img: np.ndarray) -> np.ndarray:
        """Slice ``index``'s model-domain image (H, W) -> its framed cut (h, w) float32."""
        if self.name == "radiograph-v1":
            return plan_radiograph(img).apply(index, img)
        if self.frame is None:
            return img
        return self.frame.apply(index, img)


def frame_image(img: np.ndarray, name: str | None) -> np.ndarray:
    """One 2D image (H, W) in [0, 1] (an image-folder file: a volume of one slice, square
    pixels) -> its framed cut (h, w) float32."""
    return Framer(name, lambda _: img, 1).apply(0, img)


AUTO = "auto"
RADIOGRAPHS = frozenset({"CR", "DX", "DR", "MG", "RF", "XA", "PX"})


def framing_for(modalities: tuple[str, ...] | list[str]) -> str | None:
    """The framing ``train`` uses by default for a model of these modalities: CT
    ``ct-head-v1``, MR ``mr-v1``, projection radiographs ``radiograph-v1``; None for a mix of
    kinds or no modality (no rule fits all of them)."""
    kinds = set()
    for modality in modalities:
        m = str(modality).upper()
        kinds.add("ct-head-v1" if m == "CT" else "mr-v1" if m == "MR" else
                  "radiograph-v1" if m in RADIOGRAPHS else None)  # fmt: skip
    return kinds.pop() if len(kinds) == 1 else None


def resolve_framing(name: str | None, modalities: tuple[str, ...] | list[str]) -> str | None:
    """``name`` checked, with ``AUTO`` replaced by ``framing_for(modalities)``; "none" is None."""
    if name == AUTO:
        return framing_for(modalities)
    name = None if name in (None, "none") else name
    check_framing(name)
    return name
