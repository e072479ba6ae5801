"""pdd_loss forms and parts; anomaly map blur against scipy and its typed output."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.ndimage import gaussian_filter

from model.anomaly_map import anomaly_map, gaussian_blur, level_maps
from model.loss import TAU_LOW, pdd_loss
from model.outputs import AnomalyOutput, HeadOutput, LossParts

SHAPES = [(2, 16, 16, 16), (2, 32, 8, 8), (2, 64, 4, 4)]  # high-res first


def _out(seed: int = 0, requires_grad: bool = False) -> HeadOutput:
    g = torch.Generator().manual_seed(seed)

    def level_list() -> list[torch.Tensor]:
        return [torch.randn(s, generator=g).requires_grad_(requires_grad) for s in SHAPES]

    return HeadOutput(targets=level_list(), student1=level_list(), student2=level_list())


def test_loss_forms_differ_exactly_by_cosine_convention():
    out = _out()
    code, paper = pdd_loss(out, "code"), pdd_loss(out, "paper")
    assert isinstance(code, LossParts)
    n = len(SHAPES)
    torch.testing.assert_close(paper.cos_s2_t, n - code.cos_s2_t)
    for name in ("mse_s2_t", "mse_t_s1", "diversity"):
        assert torch.equal(getattr(code, name), getattr(paper, name))
    torch.testing.assert_close(paper.total - code.total, 0.05 * (n - 2 * code.cos_s2_t))
    with pytest.raises(ValueError, match="form"):
        pdd_loss(out, "cosine")


def test_loss_parts_follow_their_definitions():
    out = _out(1)
    parts = pdd_loss(out)
    mse = sum(F.mse_loss(s, t) for s, t in zip(out.student2, out.targets, strict=True))
    torch.testing.assert_close(parts.mse_s2_t, mse)
    cos = sum(
        F.cosine_similarity(s.flatten(1), t.flatten(1)).mean()
        for s, t in zip(out.student2, out.targets, strict=True)
    )
    torch.testing.assert_close(parts.cos_s2_t, cos)
    expect = 0.02 * parts.mse_s2_t + 0.05 * parts.cos_s2_t + 0.02 * parts.mse_t_s1
    torch.testing.assert_close(parts.total, expect + 0.5 * parts.diversity)


def test_diversity_pushes_apart_identical_students_only_at_high_res():
    out = _out(2)
    same = HeadOutput(out.targets, out.student1, [s.clone() for s in out.student1])
    # cos = 1 everywhere: the 64² term is 1 − τ_low, the "keep together" terms are 0.
    torch.testing.assert_close(pdd_loss(same).diversity, torch.tensor(1 - TAU_LOW))
    opposite = HeadOutput(out.targets, out.student1, [-s for s in out.student1])
    # cos = −1: no push-apart term, and each deeper level adds τ_high − (−1).
    torch.testing.assert_close(pdd_loss(opposite).diversity, torch.tensor(2 * (0.30 + 1.0)))


def test_loss_backward_and_shape_errors():
    out = _out(3, requires_grad=True)
    pdd_loss(out).total.backward()
    assert all(t.grad is not None for level in out for t in level)
    bad = HeadOutput(out.targets, out.student1[:2], out.student2)
    with pytest.raises(ValueError, match="level lists"):
        pdd_loss(bad)


@pytest.mark.parametrize("shape", [(2, 64, 64), (1, 256, 256), (3, 10, 17), (1, 5, 40)])
@pytest.mark.parametrize("sigma", [4.0, 1.5])
def test_gaussian_blur_equals_scipy_reflect(shape, sigma):
    x = torch.rand(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    got = gaussian_blur(x, sigma).numpy()
    ref = np.stack([gaussian_filter(a, sigma=sigma, mode="reflect", truncate=4.0) for a in x])
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-12)


def test_anomaly_map_typed_output_and_score_is_max():
    out = _out(4)
    res = anomaly_map(out, image_size=48)
    assert isinstance(res, AnomalyOutput)
    assert res.maps.shape == (2, 48, 48) and res.maps.dtype == torch.float32
    assert res.scores.shape == (2,) and res.scores.dtype == torch.float32
    torch.testing.assert_close(res.scores, res.maps.amax(dim=(1, 2)))


def test_anomaly_map_matches_scipy_pipeline_and_zero_for_perfect_students():
    out = _out(5)
    levels = level_maps(out, 32)  # (B, 6, 32, 32)
    assert levels.shape == (2, 6, 32, 32)
    raw = levels.double().sum(dim=1).numpy()
    ref = np.stack([gaussian_filter(a, sigma=4) for a in raw])
    np.testing.assert_allclose(anomaly_map(out, 32).maps.numpy(), ref, rtol=0, atol=1e-5)
    perfect = HeadOutput(out.targets, out.targets, out.targets)
    res = anomaly_map(perfect, 32)
    assert res.maps.abs().max().item() < 1e-5


def test_anomaly_map_rejects_bad_image_size():
    with pytest.raises(ValueError, match="image_size"):
        anomaly_map(_out(), image_size=0)
