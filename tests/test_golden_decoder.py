"""Reproduce the pdd_decoder golden fixtures (skips cleanly without ../shared/golden)."""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open

from model.golden.checks import GoldenCheck
from model.golden.decoder import check_decoder, load_decoder_state
from model.head import PDDHead

pytestmark = pytest.mark.realdata


def test_state_decodes_exactly_and_loads_strictly(golden_dir):
    state = load_decoder_state(golden_dir / "pdd_decoder_state.safetensors")
    assert not any(k.endswith("__scale__") for k in state)
    head = PDDHead()
    head.load_state_dict(state, strict=True)
    with safe_open(str(golden_dir / "pdd_decoder_state.safetensors"), framework="pt") as f:
        scale = f.get_tensor("layer1.0.upsample.0.weight.__scale__")
    q = state["layer1.0.upsample.0.weight"] / scale  # (2048, 1024, 2, 2), int8 × 2^-k
    assert torch.equal(q, q.round()) and q.abs().max() <= 127


def test_every_decoder_golden_item_within_tolerance(golden_dir):
    threads = torch.get_num_threads()
    checks = check_decoder(golden_dir)
    assert torch.get_num_threads() == threads
    assert all(isinstance(c, GoldenCheck) for c in checks)
    names = {c.name for c in checks}
    for item in (
        "pdd_decoder/keys",
        "pdd_decoder/num_parameters",
        "reduced/train.out0_vssm_fc",
        "reduced/train.loss_l_s_s",
        "reduced/train.post_state.layer1.0.bn1.num_batches_tracked",
        "reduced/eval.anomaly_map_f64",
        "native/train.loss",
        "native/eval.image_score_f64",
        "lossunit/DiversityLoss",
    ):
        assert item in names, item
    failed = [c for c in checks if not c.passed]
    assert failed == [], failed
