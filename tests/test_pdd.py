"""PDD assembly and ModelConfig: shapes, frozen teachers, predict/loss, configs."""

from __future__ import annotations

import json

import pytest
import torch

from model.config import ConfigError, ModelConfig, get_config
from model.head import PDDHead
from model.outputs import AnomalyOutput, HeadOutput, LossParts
from model.pdd import PDD, build_model

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def pdd() -> PDD:
    return build_model(get_config("test"))


def _shapes(levels: list[torch.Tensor]) -> list[tuple[int, ...]]:
    return [tuple(t.shape) for t in levels]


def test_forward_shapes_follow_the_cnn_teacher(pdd: PDD) -> None:
    s = pdd.image_size
    out = pdd(torch.rand(2, 1, s, s))
    assert isinstance(out, HeadOutput)
    c1, c2, c3, _ = pdd.teacher_cnn.channels
    want = [(2, c1, s // 4, s // 4), (2, c2, s // 8, s // 8), (2, c3, s // 16, s // 16)]
    for levels in out:
        assert _shapes(levels) == want
        assert all(torch.isfinite(t).all() for t in levels)


def test_grey_input_equals_replicated_rgb(pdd: PDD) -> None:
    pdd.eval()
    grey = torch.rand(2, 1, 64, 64)
    a = pdd.predict(grey)
    b = pdd.predict(grey.repeat(1, 3, 1, 1))
    torch.testing.assert_close(a.maps, b.maps)


def test_normalisation_is_imagenet_inside(pdd: PDD) -> None:
    x = torch.rand(2, 3, 64, 64)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    cnn, mamba = pdd.teacher_features(x)
    torch.testing.assert_close(cnn[0], pdd.teacher_cnn((x - mean) / std)[0])
    torch.testing.assert_close(mamba[3], pdd.teacher_mamba((x - mean) / std)[3])


@pytest.mark.parametrize(
    "shape", [(2, 2, 64, 64), (2, 1, 64, 48), (1, 64, 64), (2, 3, 50, 50), (0, 3, 64, 64)]
)
def test_bad_input_shapes_raise_naming_the_shape(pdd: PDD, shape: tuple[int, ...]) -> None:
    with pytest.raises(ValueError, match=str(shape).replace("(", r"\(").replace(")", r"\)")):
        pdd(torch.rand(shape))


def test_integer_input_is_rejected(pdd: PDD) -> None:
    with pytest.raises(ValueError, match="dtype"):
        pdd(torch.zeros(1, 1, 64, 64, dtype=torch.uint8))


def test_train_keeps_teachers_frozen_and_only_head_learns() -> None:
    model = build_model(get_config("test"))
    model.train()
    assert model.head.training
    assert not model.teacher_cnn.training and not model.teacher_mamba.training
    trainable = list(model.trainable_parameters())
    assert {id(p) for p in trainable} == {id(p) for p in model.head.parameters()}
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == sum(
        p.numel() for p in trainable
    )
    teacher_before = {k: v.clone() for k, v in model.teacher_cnn.state_dict().items()}
    parts = model.loss(torch.rand(2, 1, 64, 64))
    assert isinstance(parts, LossParts) and torch.isfinite(parts.total)
    parts.total.backward()
    assert all(p.grad is not None for p in trainable if p.requires_grad)
    assert all(p.grad is None for p in model.teacher_cnn.parameters())
    # InA targets are not detached: the adapters receive gradient from the distillation loss.
    assert model.head.up_dim_v_r1.conv1.weight.grad.abs().sum() > 0
    after = model.teacher_cnn.state_dict()
    assert all(torch.equal(teacher_before[k], after[k]) for k in after)


def test_predict_is_eval_no_grad_and_restores_mode(pdd: PDD) -> None:
    pdd.train()
    x = torch.rand(3, 1, 64, 64)
    res = pdd.predict(x)
    assert pdd.training and pdd.head.training  # mode restored
    assert isinstance(res, AnomalyOutput)
    assert res.maps.shape == (3, 64, 64) and res.scores.shape == (3,)
    assert res.maps.dtype == torch.float32 and not res.maps.requires_grad
    torch.testing.assert_close(res.scores, res.maps.flatten(1).amax(1))
    pdd.eval()
    torch.testing.assert_close(pdd.predict(x).maps, res.maps)  # eval BN both times


def test_bf16_predict_runs_the_network_in_bf16_and_scores_in_float32(pdd: PDD) -> None:
    """bf16 autocast (CPU here, CUDA in production) moves scores by well under a percent;
    maps stay float32; an unknown precision is refused by name."""
    x = torch.rand(4, 1, 64, 64, generator=torch.Generator().manual_seed(3))
    full = pdd.predict(x)
    low = pdd.predict(x, precision="bf16")
    assert low.maps.dtype == torch.float32 and low.scores.dtype == torch.float32
    assert not torch.equal(low.scores, full.scores)  # the forward really ran in bf16
    torch.testing.assert_close(low.scores, full.scores, rtol=2e-2, atol=0)
    with pytest.raises(ValueError, match="precision must be one of"):
        pdd.predict(x, precision="fp16")


def test_forward_from_cached_features_equals_forward(pdd: PDD) -> None:
    pdd.eval()
    x = torch.rand(2, 1, 64, 64)
    with torch.no_grad():
        direct = pdd(x)
        cached = pdd.forward_from_features(*pdd.teacher_features(x))
    for a, b in zip(direct, cached, strict=True):
        for ta, tb in zip(a, b, strict=True):
            torch.testing.assert_close(ta, tb)


def test_loss_form_comes_from_the_config() -> None:
    torch.manual_seed(0)
    x = torch.rand(2, 1, 64, 64)
    code = build_model(get_config("test")).eval().loss(x)
    paper = build_model(get_config("test", loss_form="paper")).eval().loss(x)
    torch.testing.assert_close(code.mse_s2_t, paper.mse_s2_t)  # same seeded weights
    assert not torch.allclose(code.cos_s2_t, paper.cos_s2_t)


def test_paper_head_has_the_published_trainable_parameter_count() -> None:
    cfg = get_config("paper")
    head = PDDHead(
        cnn_channels=(256, 512, 1024, 2048),  # wide_resnet50_2 layers 1-4
        mamba_channels=(192, 384, 768, 768),  # VMamba-T v0 levels 1-4
        adapter_reduction=cfg.adapter_reduction,
        blocks_per_stage=cfg.blocks_per_stage,
    )
    assert sum(p.numel() for p in head.parameters()) == 30_407_424


@pytest.mark.slow
def test_paper_model_at_256_matches_pdd_spec_shapes() -> None:
    cfg = get_config("paper", cnn_source="random", cnn_seed=0, mamba_source="random", mamba_seed=0)
    model = build_model(cfg)
    assert sum(p.numel() for p in model.trainable_parameters()) == 30_407_424
    x = torch.rand(1, 1, 256, 256)
    with torch.no_grad():
        cnn, mamba = model.teacher_features(x)
        out = model.forward_from_features(cnn, mamba)
    assert _shapes(cnn) == [(1, 256, 64, 64), (1, 512, 32, 32), (1, 1024, 16, 16), (1, 2048, 8, 8)]
    assert _shapes(mamba) == [(1, 192, 32, 32), (1, 384, 16, 16), (1, 768, 8, 8), (1, 768, 8, 8)]
    for levels in out:
        assert _shapes(levels) == [(1, 256, 64, 64), (1, 512, 32, 32), (1, 1024, 16, 16)]


def test_paper_config_without_vmamba_weights_fails_fast_and_says_how(monkeypatch) -> None:
    from model.teachers import TeacherWeightsError

    monkeypatch.delenv("PDD_VMAMBA_WEIGHTS", raising=False)
    cfg = get_config("paper", cnn_source="random", cnn_seed=0)
    with pytest.raises(TeacherWeightsError, match="PDD_VMAMBA_WEIGHTS"):
        build_model(cfg)


def test_config_round_trips_through_json() -> None:
    for name in ("paper", "test", "lite0"):
        cfg = get_config(name)
        again = ModelConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
        assert again == cfg


def test_config_overrides_and_errors_name_the_key() -> None:
    cfg = get_config("lite0", image_size=128, mamba_arch="vmamba_d32_1-1-2-1", mamba_seed=4)
    assert cfg.image_size == 128 and cfg.mamba_teacher.arch == "vmamba_d32_1-1-2-1"
    assert cfg.mamba_teacher.seed == 4 and cfg.cnn_teacher.source == "efficientnet_lite0_pkg"
    cfg = get_config("paper", cnn_source="file", cnn_weights="/w/wrn.pth")
    assert cfg.cnn_teacher.source == "file" and cfg.cnn_teacher.weights == "/w/wrn.pth"
    with pytest.raises(ConfigError, match="colour"):
        get_config("test", colour="red")
    with pytest.raises(ConfigError, match="image_size"):
        get_config("test", image_size=50)
    with pytest.raises(ConfigError, match="loss_form"):
        get_config("test", loss_form="fancy")
    with pytest.raises(ConfigError, match="nope"):
        get_config("nope")
    with pytest.raises(ConfigError, match="mamba_teacher"):
        ModelConfig.from_dict({**get_config("test").to_dict(), "mamba_teacher": None})
    with pytest.raises(ConfigError, match="extra"):
        ModelConfig.from_dict({**get_config("test").to_dict(), "extra": 1})


def test_lite0_config_builds_with_package_weights_and_a_custom_vmamba() -> None:
    model = build_model(get_config("lite0", image_size=64, mamba_arch="vmamba_d24_1-1-1-1"))
    assert model.teacher_cnn.provenance["file_sha256"] is not None
    assert model.teacher_mamba.channels == (48, 96, 192, 192)
    res = model.predict(torch.rand(1, 1, 64, 64))
    assert res.maps.shape == (1, 64, 64) and torch.isfinite(res.maps).all()


def test_rd4ad_arch_dispatches_to_model_rd4ad() -> None:
    rd4ad = pytest.importorskip("model.rd4ad")
    cfg = get_config("test", arch="rd4ad")
    model = build_model(cfg)
    assert isinstance(model, rd4ad.RD4AD)
