"""Synthetic lesions on normal images: a validation figure that needs no labelled anomaly.

The figure (``synthetic_figure``) is the image AUROC of held-out *normal* images against copies of
the same images with synthetic lesions pasted in, with a bootstrap interval that resamples source
images (a normal and all its copies move together). It ranks models; it is not a test AUROC.

``lesioned_copies`` draws lesions from several generator families (after Baugh et al., MICCAI 2023:
cross-validate over several synthetic tasks rather than trust one), each with varied sizes,
intensities and 1–3 lesions per copy, placed on tissue (pixels brighter than a fraction of the
image's 99th percentile). Every draw is seeded per (seed, image, family, copy), so a copy does not
depend on which other images or families are drawn.

Families (values are grey levels in [0, 1] of the model input):

* ``bleed``: small irregular hyperdense blobs (acute haemorrhage in a brain window);
* ``mass``: round discs with their own texture and a contrast of either sign (tumour, nodule);
* ``consolidation``: large, very soft hazy patches toward the bright end (pneumonia, oedema);
* ``intensity``: smooth multiplicative shifts up or down (infarct, hypo/hyperdensity);
* ``patch``: a patch of another normal image blended in (foreign-patch interpolation, FPI).

``bright_ellipses`` is the earlier single-family generator (one bright ellipse per copy), kept so
the before/after comparison of docs/results.md can be rerun. Pure numpy/scipy: no torch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import ndimage

FAMILIES = ("bleed", "mass", "consolidation", "intensity", "patch")
MAX_LESIONS = 3  # lesions per copy: 1..MAX_LESIONS


class SyntheticError(ValueError):
    """Images or scores a synthetic-lesion figure cannot be made from (named in the message)."""


@dataclass(frozen=True)
class LesionedSet:
    """Copies of normal images with synthetic lesions.

    Attributes:
        images: (M, S, S) float32 in [0, 1].
        source: (M,) index of the normal image each copy was made from.
        family: (M,) index into ``FAMILIES`` of each copy's generator.
    """

    images: np.ndarray
    source: np.ndarray
    family: np.ndarray


def bright_ellipses(images: np.ndarray, per_image: int = 3, seed: int = 0) -> np.ndarray:
    """The earlier generator: copies of (N, S, S) normals with one bright soft-edged ellipse each
    (intensity 0.75–0.95), placed where the image is brighter than 0.15: (N * per_image, S, S)."""
    rng = np.random.default_rng(seed)
    _, size, _ = images.shape
    yy, xx = np.mgrid[:size, :size].astype(np.float32)
    out = []
    for img in images:
        inside = np.argwhere(img > 0.15)
        for _ in range(per_image):
            cy, cx = inside[rng.integers(len(inside))] if len(inside) else (size / 2, size / 2)
            ry, rx = rng.uniform(size / 40, size / 10, size=2)
            d = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2
            alpha = np.clip(1.5 - d, 0, 1) * (img > 0.05)  # soft edge, only on tissue
            out.append(img * (1 - alpha) + rng.uniform(0.75, 0.95) * alpha)
    return np.stack(out).astype(np.float32)


def _tissue(img: np.ndarray) -> np.ndarray:
    """Pixels that carry anatomy: brighter than 20 % of the 99th percentile (at least 0.05)."""
    return img > max(0.05, 0.2 * float(np.percentile(img, 99)))


def _shape(size: int, rng: np.random.Generator, centre: np.ndarray, radius: float,
           irregular: float) -> np.ndarray:  # fmt: skip
    """Normalised distance (S, S) of a rotated ellipse, its boundary bent by smooth noise:
    < 1 inside. ``irregular`` is the relative amplitude of the bend."""
    yy, xx = np.mgrid[:size, :size].astype(np.float32)
    angle = rng.uniform(0, np.pi)
    ratio = rng.uniform(0.6, 1.0)
    dy, dx = yy - centre[0], xx - centre[1]
    u = dx * np.cos(angle) + dy * np.sin(angle)
    v = -dx * np.sin(angle) + dy * np.cos(angle)
    d = np.sqrt((u / radius) ** 2 + (v / (radius * ratio)) ** 2)
    if irregular > 0:
        bend = ndimage.gaussian_filter(rng.standard_normal((size, size)), radius / 2)
        d = d * (1 + irregular * bend / (np.abs(bend).max() + 1e-8))
    return d.astype(np.float32)


def _texture(size: int, rng: np.random.Generator, sigma: float) -> np.ndarray:
    """Smooth zero-mean noise (S, S) with unit peak."""
    t = ndimage.gaussian_filter(rng.standard_normal((size, size)), sigma)
    return (t / (np.abs(t).max() + 1e-8)).astype(np.float32)


def _one_lesion(img: np.ndarray, family: str, rng: np.random.Generator, donor: np.ndarray,
                tissue: np.ndarray, centre: np.ndarray) -> np.ndarray:  # fmt: skip
    """``img`` with one lesion of ``family`` centred at ``centre`` (row, col)."""
    size = img.shape[0]
    hi = float(np.percentile(img[tissue], 95)) if tissue.any() else 0.8
    if family == "bleed":
        d = _shape(size, rng, centre, rng.uniform(size / 40, size / 12), 0.35)
        a = np.clip((1 - d) / 0.3, 0, 1) * tissue
        mid = float(np.median(img[tissue])) if tissue.any() else 0.5
        level = min(1.0, mid + rng.uniform(0.2, 0.45))
        return img * (1 - a) + level * a
    if family == "mass":
        d = _shape(size, rng, centre, rng.uniform(size / 20, size / 8), 0.1)
        a = np.clip((1 - d) / 0.15, 0, 1)
        local = float(img[d < 1].mean()) if (d < 1).any() else float(img.mean())
        fill = local + rng.choice([-1, 1]) * rng.uniform(0.1, 0.3)
        fill = fill + rng.uniform(0.03, 0.1) * _texture(size, rng, rng.uniform(0.8, 2.0))
        return img * (1 - a) + np.clip(fill, 0, 1) * a
    if family == "consolidation":
        d = _shape(size, rng, centre, rng.uniform(size / 10, size / 5), 0.25)
        a = np.exp(-2.0 * d**2) * rng.uniform(0.3, 0.6) * tissue
        return img + a * (hi - img)
    if family == "intensity":
        d = _shape(size, rng, centre, rng.uniform(size / 16, size / 6), 0.2)
        a = np.exp(-2.0 * d**2) * tissue
        return img * (1 + a * rng.choice([-1, 1]) * rng.uniform(0.15, 0.35))
    if family == "patch":
        d = _shape(size, rng, centre, rng.uniform(size / 16, size / 6), 0.0)
        a = np.clip((1 - d) / 0.2, 0, 1) * rng.uniform(0.5, 0.9)
        shift = rng.integers(-size // 4, size // 4 + 1, size=2)
        moved = np.roll(donor, tuple(int(s) for s in shift), axis=(0, 1))
        return img * (1 - a) + moved * a
    raise SyntheticError(f"unknown lesion family {family!r} (one of {FAMILIES})")


def _lesioned(img: np.ndarray, family: str, rng: np.random.Generator,
              donor: np.ndarray) -> np.ndarray:  # fmt: skip
    """One copy of ``img`` (S, S) with 1..MAX_LESIONS lesions of one family on tissue."""
    tissue = _tissue(img)
    inside = np.argwhere(tissue)
    size = img.shape[0]
    out = img.astype(np.float32).copy()
    for _ in range(int(rng.integers(1, MAX_LESIONS + 1))):
        if len(inside):
            centre = inside[rng.integers(len(inside))].astype(np.float32)
        else:
            centre = np.array([size / 2, size / 2], np.float32)
        out = _one_lesion(out, family, rng, donor, tissue, centre)
    return np.clip(out, 0.0, 1.0).astype(np.float32)


def _donor(n: int, i: int, key: list[int]) -> int:
    """Index of another normal than ``i`` (itself when it is the only one), seeded by ``key``."""
    if n < 2:
        return i
    j = int(np.random.default_rng(key).integers(n - 1))
    return j + (j >= i)


def lesioned_copies(
    images: np.ndarray,
    *,
    copies_per_family: int = 1,
    families: Sequence[str] = FAMILIES,
    seed: int = 0,
) -> LesionedSet:
    """Copies of (N, S, S) normal images in [0, 1] with synthetic lesions: every image gets
    ``copies_per_family`` copies per family, (N * len(families) * copies_per_family, S, S).

    Raises:
        SyntheticError: not a stack of square images, or an unknown family.
    """
    images = np.asarray(images, dtype=np.float32)
    if images.ndim != 3 or images.shape[1] != images.shape[2] or len(images) == 0:
        raise SyntheticError(f"need a non-empty (N, S, S) stack, got shape {images.shape}")
    unknown = sorted(set(families) - set(FAMILIES))
    if unknown:
        raise SyntheticError(f"unknown lesion families {unknown} (known: {list(FAMILIES)})")
    codes = [FAMILIES.index(f) for f in families]
    out, source, family = [], [], []
    for i, img in enumerate(images):
        for code in codes:
            for copy in range(copies_per_family):
                rng = np.random.default_rng([seed, i, code, copy])
                donor = images[_donor(len(images), i, [seed, i, code, copy, 1])]
                out.append(_lesioned(img, FAMILIES[code], rng, donor))
                source.append(i)
                family.append(code)
    return LesionedSet(np.stack(out), np.array(source), np.array(family))


def _auroc(anomalous: np.ndarray, normal: np.ndarray) -> float:
    """Mann–Whitney AUROC, ties counted ½."""
    from scipy.stats import rankdata

    ranks = rankdata(np.concatenate([anomalous, normal]))
    n1, n0 = len(anomalous), len(normal)
    return float((ranks[:n1].sum() - n1 * (n1 + 1) / 2) / (n1 * n0))


def synthetic_figure(
    normal_scores: Sequence[float],
    lesion_scores: Sequence[float],
    source: Sequence[int],
    family: Sequence[int] | None = None,
    *,
    level: float = 0.95,
    n_resamples: int = 1000,
    seed: int = 0,
) -> dict[str, Any]:
    """AUROC of normals vs their lesioned copies, with a bootstrap interval over source images
    (each resample draws normals with replacement and takes every copy of each drawn normal).

    Returns:
        ``{"auroc", "ci95": [lo, hi], "n_normal", "n_lesioned", "per_family": {name: auroc}}``.

    Raises:
        SyntheticError: no normal or no lesioned score, scores not finite, or a copy whose source
            is not one of the normals.
    """
    normal = np.asarray(normal_scores, dtype=np.float64)
    lesion = np.asarray(lesion_scores, dtype=np.float64)
    src = np.asarray(source, dtype=np.int64)
    if normal.size == 0 or lesion.size == 0:
        raise SyntheticError("the figure needs normal scores and lesioned-copy scores")
    if not (np.isfinite(normal).all() and np.isfinite(lesion).all()):
        raise SyntheticError("scores contain NaN or inf")
    if src.shape != lesion.shape or src.min() < 0 or src.max() >= normal.size:
        raise SyntheticError("every lesioned copy needs the index of its source normal")
    rng = np.random.default_rng(seed)
    copies = [np.flatnonzero(src == i) for i in range(normal.size)]
    boots = []
    for _ in range(n_resamples):
        drawn = rng.integers(normal.size, size=normal.size)
        idx = np.concatenate([copies[i] for i in drawn])
        if idx.size:
            boots.append(_auroc(lesion[idx], normal[drawn]))
    alpha = (1 - level) / 2
    lo, hi = np.quantile(boots, [alpha, 1 - alpha]) if boots else (np.nan, np.nan)
    out: dict[str, Any] = {
        "auroc": _auroc(lesion, normal),
        "ci95": [float(lo), float(hi)],
        "n_normal": int(normal.size),
        "n_lesioned": int(lesion.size),
    }
    if family is not None:
        fam = np.asarray(family, dtype=np.int64)
        out["per_family"] = {
            FAMILIES[f]: _auroc(lesion[fam == f], normal) for f in sorted(set(fam.tolist()))
        }
    return out


def paired_difference(
    a: tuple[Sequence[float], Sequence[float]],
    b: tuple[Sequence[float], Sequence[float]],
    source: Sequence[int],
    *,
    level: float = 0.95,
    n_resamples: int = 1000,
    seed: int = 0,
) -> tuple[float, float, float]:
    """Figure of model ``a`` minus figure of model ``b`` on the same normals and copies, with a
    paired bootstrap interval (one resample of source images serves both models).

    ``a`` and ``b`` are (normal scores, lesioned-copy scores) in the same order; ``source`` maps
    each copy to its normal. Returns (difference, low, high).
    """
    an, al = (np.asarray(x, dtype=np.float64) for x in a)
    bn, bl = (np.asarray(x, dtype=np.float64) for x in b)
    src = np.asarray(source, dtype=np.int64)
    if an.shape != bn.shape or al.shape != bl.shape or src.shape != al.shape:
        raise SyntheticError("paired figures need the same normals and copies for both models")
    rng = np.random.default_rng(seed)
    copies = [np.flatnonzero(src == i) for i in range(an.size)]
    boots = []
    for _ in range(n_resamples):
        drawn = rng.integers(an.size, size=an.size)
        idx = np.concatenate([copies[i] for i in drawn])
        if idx.size:
            boots.append(_auroc(al[idx], an[drawn]) - _auroc(bl[idx], bn[drawn]))
    alpha = (1 - level) / 2
    lo, hi = np.quantile(boots, [alpha, 1 - alpha]) if boots else (np.nan, np.nan)
    return _auroc(al, an) - _auroc(bl, bn), float(lo), float(hi)
