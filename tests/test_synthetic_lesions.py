"""Synthetic lesions and the validation figure (pdd_batch.evaluation.synthetic; no torch)."""

from __future__ import annotations

import numpy as np
import pytest

from pdd_batch.evaluation.synthetic import (
    FAMILIES,
    SyntheticError,
    bright_ellipses,
    lesioned_copies,
    synthetic_figure,
)


def _normals(n: int = 4, size: int = 48) -> np.ndarray:
    """Discs of textured 'tissue' on black, like a head slice: (n, size, size)."""
    rng = np.random.default_rng(1)
    yy, xx = np.mgrid[:size, :size]
    disc = np.hypot(yy - size / 2, xx - size / 2) < size * 0.35
    tissue = [disc * (0.4 + 0.05 * rng.standard_normal((size, size))) for _ in range(n)]
    return np.stack(tissue).clip(0, 1).astype(np.float32)


def test_every_family_changes_each_copy_and_is_seeded() -> None:
    images = _normals()
    a = lesioned_copies(images, seed=3)
    b = lesioned_copies(images, seed=3)
    assert a.images.shape == (len(images) * len(FAMILIES), 48, 48)
    assert np.array_equal(a.images, b.images)  # same seed, same copies
    assert not np.array_equal(a.images, lesioned_copies(images, seed=4).images)
    assert sorted(set(a.family.tolist())) == list(range(len(FAMILIES)))
    assert a.images.min() >= 0.0 and a.images.max() <= 1.0
    for k, img in enumerate(a.images):
        changed = np.abs(img - images[a.source[k]]) > 1e-3
        assert changed.any(), FAMILIES[a.family[k]]  # every copy carries a lesion
    # a copy does not depend on which other images are drawn
    single = lesioned_copies(images[:1], seed=3, families=["mass"])
    first_mass = a.images[(a.source == 0) & (a.family == FAMILIES.index("mass"))][0]
    assert np.array_equal(single.images[0], first_mass)


def test_lesions_stay_on_tissue_for_the_bleed_family() -> None:
    images = _normals()
    out = lesioned_copies(images, families=["bleed", "consolidation", "intensity"], seed=0)
    background = images[out.source] == 0  # (M, S, S)
    assert np.all(out.images[background] == 0)


def test_figure_is_one_for_separated_scores_and_its_interval_brackets_it() -> None:
    normal = np.array([0.1, 0.2, 0.3, 0.4])
    source = np.repeat(np.arange(4), 2)
    f = synthetic_figure(normal, np.full(8, 0.9), source, np.zeros(8, int))
    assert f["auroc"] == 1.0 and f["ci95"] == [1.0, 1.0] and f["per_family"] == {"bleed": 1.0}
    noisy = synthetic_figure(*_noisy())
    assert noisy["ci95"][0] <= noisy["auroc"] <= noisy["ci95"][1]
    assert noisy["ci95"][1] - noisy["ci95"][0] > 0.05  # 20 normals cannot pin it
    assert noisy == synthetic_figure(*_noisy())  # seeded


def _noisy() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    return rng.random(20), rng.random(60), np.repeat(np.arange(20), 3)


def test_bad_inputs_are_named() -> None:
    with pytest.raises(SyntheticError, match="source"):
        synthetic_figure([0.1, 0.2], [0.5], [5])
    with pytest.raises(SyntheticError, match="NaN"):
        synthetic_figure([np.nan, 0.2], [0.5], [0])
    with pytest.raises(SyntheticError, match="unknown"):
        lesioned_copies(_normals(), families=["tumour"])
    with pytest.raises(SyntheticError, match="stack"):
        lesioned_copies(np.zeros((2, 8, 9)))


def test_the_earlier_generator_is_kept_for_comparison() -> None:
    images = _normals(2)
    out = bright_ellipses(images, per_image=3, seed=0)
    assert out.shape == (6, 48, 48) and (out >= images.repeat(3, axis=0) - 1e-6).all()
