"""PDDHead: golden key manifest, generic channel counts, forward/backward, BN behaviour."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

from model.decoder import stage_width
from model.head import PDDHead
from model.loss import pdd_loss
from model.outputs import HeadOutput
from tests.conftest import shared_path

LITE0 = (24, 40, 112, 320)  # EfficientNet-Lite0 levels
SMALL_MAMBA = (32, 64, 128, 128)  # vmamba_small-style teacher


def _feats(cnn, mamba, image: int, batch: int = 2, seed: int = 0):
    """Random teacher maps for a square input of side ``image`` (CNN H/4..H/32, VMamba H/8..)."""
    g = torch.Generator().manual_seed(seed)
    cnn_sizes = [image // 4, image // 8, image // 16, image // 32]
    vm_sizes = [image // 8, image // 16, image // 32, image // 32]
    y = [
        torch.randn(batch, c, s, s, generator=g).relu() for c, s in zip(cnn, cnn_sizes, strict=True)
    ]
    z = [torch.randn(batch, c, s, s, generator=g) for c, s in zip(mamba, vm_sizes, strict=True)]
    return y, z


@pytest.mark.realdata
def test_paper_head_matches_golden_manifest():
    manifest = json.loads(shared_path("golden", "pdd_decoder_keys.json").read_text())
    head = PDDHead()
    mine = [
        (k, list(v.shape), str(v.dtype).removeprefix("torch."))
        for k, v in head.state_dict().items()
    ]
    ref = [(e["key"], e["shape"], e["dtype"]) for e in manifest["keys"]]
    assert mine == ref
    assert sum(p.numel() for p in head.parameters()) == manifest["num_parameters"] == 30_407_424
    assert sum(b.numel() for b in head.buffers()) == manifest["num_buffer_elements"]


def test_paper_head_param_count_without_fixture():
    head = PDDHead((256, 512, 1024, 2048), (192, 384, 768, 768))
    assert sum(p.numel() for p in head.parameters()) == 30_407_424
    assert len(head.state_dict()) == 210


def test_stage_width_rule_gives_paper_widths():
    head = PDDHead()
    assert [stage_width(c) for c in (1024, 512, 256)] == [512, 256, 128]
    assert head.layer1[0].conv2.weight.shape == (512, 512, 2, 2)
    assert head.layer3[1].conv2.weight.shape == (128, 128, 3, 3)
    assert head.up_dim_v_r4.conv2.dilation == (2, 2)


def test_init_kaiming_fan_out_and_bn_constants():
    torch.manual_seed(0)
    head = PDDHead(LITE0, SMALL_MAMBA)
    w = head.up_dim_v_r4.residual_proj.weight  # (320, 128, 1, 1): fan_out = 320
    assert abs(w.std().item() - math.sqrt(2 / 320)) < 0.1 * math.sqrt(2 / 320)
    for m in head.modules():
        if isinstance(m, nn.BatchNorm2d):
            assert torch.all(m.weight == 1) and torch.all(m.bias == 0)


@pytest.mark.parametrize("image", [64, 96])
def test_small_head_forward_backward_any_input_size(image):
    torch.manual_seed(0)
    head = PDDHead(LITE0, SMALL_MAMBA).train()
    y, z = _feats(LITE0, SMALL_MAMBA, image)
    out = head(y, z)
    assert isinstance(out, HeadOutput)
    sizes = (image // 4, image // 8, image // 16)
    for level, (c, s) in enumerate(zip(LITE0[:3], sizes, strict=True)):
        for feats in out:
            assert feats[level].shape == (2, c, s, s)
    parts = pdd_loss(out)
    assert torch.isfinite(parts.total)
    parts.total.backward()
    missing = [n for n, p in head.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert missing == []  # targets are not detached: the adapters train too


def test_students_share_16px_level_and_differ_above():
    torch.manual_seed(0)
    head = PDDHead(LITE0, SMALL_MAMBA).eval()
    y, z = _feats(LITE0, SMALL_MAMBA, 64)
    with torch.no_grad():
        out = head(y, z)
    assert torch.equal(out.student1[2], out.student2[2])
    assert not torch.allclose(out.student1[1], out.student2[1])
    assert not torch.allclose(out.student1[0], out.student2[0])


def test_train_forward_updates_decoder_bn_twice_and_adapters_once():
    head = PDDHead(LITE0, SMALL_MAMBA).train()
    head(*_feats(LITE0, SMALL_MAMBA, 64))
    sd = head.state_dict()
    for key, value in sd.items():
        if key.endswith("num_batches_tracked"):
            assert value.item() == (2 if key.startswith("layer") else 1), key
    head.eval()
    with torch.no_grad():
        head(*_feats(LITE0, SMALL_MAMBA, 64, seed=1))
    assert all(torch.equal(sd[k], v) for k, v in head.state_dict().items())


def test_prior_size_override_is_used_and_must_fit():
    head = PDDHead(LITE0, SMALL_MAMBA, prior_sizes=[(4, 4), (8, 8)]).eval()
    with torch.no_grad():
        head(*_feats(LITE0, SMALL_MAMBA, 64))  # decoder sizes 4 and 8 at 64 px: fits
        with pytest.raises(RuntimeError):
            head(*_feats(LITE0, SMALL_MAMBA, 128))  # decoder sizes 8 and 16: the override breaks


def test_bad_inputs_raise_value_error_naming_the_level():
    head = PDDHead(LITE0, SMALL_MAMBA)
    y, z = _feats(LITE0, SMALL_MAMBA, 64)
    with pytest.raises(ValueError, match="CNN level 2"):
        head([y[0], y[0], y[2], y[3]], z)
    with pytest.raises(ValueError, match="level 1 VMamba map"):
        head(y, [torch.randn(2, 32, 16, 16), *z[1:]])
    with pytest.raises(ValueError, match="4 CNN"):
        head(y[:3], z)
    with pytest.raises(ValueError, match="cnn_channels"):
        PDDHead((1, 2, 3), SMALL_MAMBA)
