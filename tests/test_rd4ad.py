"""RD4AD baseline: shapes, frozen teacher, loss, anomaly map, config registration."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from model.anomaly_map import anomaly_map
from model.config import ConfigError, get_config
from model.rd4ad import RD4AD, build_rd4ad
from model.train_step import feature_bank, make_optimizer, predict_from_features, train_step


@pytest.fixture(scope="module")
def rd4ad() -> RD4AD:
    torch.manual_seed(0)
    cfg = get_config(
        "rd4ad", image_size=64, cnn_name="resnet18", cnn_arch="resnet18",
        cnn_source="random", cnn_seed=0,
    )  # fmt: skip
    return build_rd4ad(cfg)


def test_rd4ad_config_is_registered() -> None:
    cfg = get_config("rd4ad")
    assert cfg.arch == "rd4ad" and cfg.mamba_teacher is None
    assert cfg.cnn_teacher.source == "efficientnet_lite0_pkg"
    with pytest.raises(ConfigError, match="image_size"):
        get_config("rd4ad", image_size=50)


def test_shapes_and_frozen_teacher(rd4ad: RD4AD) -> None:
    x = torch.rand(2, 1, 64, 64)
    rd4ad.train()
    assert not rd4ad.teacher_cnn.training
    out = rd4ad(x)
    assert [t.shape[1:] for t in out.targets] == [(64, 16, 16), (128, 8, 8), (256, 4, 4)]
    assert [s.shape for s in out.student1] == [t.shape for t in out.targets]
    trainable = {id(p) for p in rd4ad.trainable_parameters()}
    assert all(id(p) not in trainable for p in rd4ad.teacher_cnn.parameters())
    assert all(not p.requires_grad for p in rd4ad.teacher_cnn.parameters())
    with pytest.raises(ValueError, match="shape|\\(B"):
        rd4ad(torch.rand(2, 2, 64, 64))


def test_loss_falls_and_teacher_does_not_change(rd4ad: RD4AD) -> None:
    torch.manual_seed(0)
    before = {k: v.clone() for k, v in rd4ad.teacher_cnn.state_dict().items()}
    bank = feature_bank(rd4ad, torch.rand(8, 1, 64, 64))
    opt = make_optimizer(rd4ad.trainable_parameters(), lr=2e-3)
    rd4ad.train()
    losses = [float(train_step(rd4ad, opt, bank).total) for _ in range(8)]
    assert losses[-1] < 0.8 * losses[0]
    after = rd4ad.teacher_cnn.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_map_is_rd4ad_three_level_map(rd4ad: RD4AD) -> None:
    x = torch.rand(3, 1, 64, 64)
    res = rd4ad.predict(x)
    assert res.maps.shape == (3, 64, 64) and res.scores.shape == (3,)
    rd4ad.eval()
    with torch.no_grad():
        full = anomaly_map(rd4ad(x), 64)
    torch.testing.assert_close(res.maps * 2, full.maps)
    torch.testing.assert_close(res.scores, res.maps.amax(dim=(1, 2)))
    cached = predict_from_features(rd4ad, feature_bank(rd4ad, x), 64, batch_size=2)
    torch.testing.assert_close(cached.scores, res.scores)


def test_rd4ad_config_is_in_the_registry_without_importing_model_rd4ad() -> None:
    """The config registry holds "rd4ad" itself: no registration on import, no config <-> rd4ad
    import loop."""
    probe = (
        "import sys\nfrom model.config import config_names, get_config\n"
        "names = config_names()\ncfg = get_config('rd4ad')\n"
        "print('rd4ad' in names, cfg.arch, 'model.rd4ad' in sys.modules)"
    )
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run(
        [sys.executable, "-c", probe], cwd=root, capture_output=True, text=True, check=True
    )
    assert out.stdout.split() == ["True", "rd4ad", "False"]
