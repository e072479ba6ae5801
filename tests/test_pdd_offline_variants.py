"""Issue 17's PDD options: Teacher M detached from or gated out of the fusion, the diversity
weight, and a CNN in Teacher M's slot (a heterogeneous pair), each at test size: forward and
backward, config round trip, checkpoint save/load. The defaults keep PDD_SPEC (the golden tests)."""

from __future__ import annotations

import json

import pytest
import torch

from model.checkpoint import CONFIG_FILE, load_checkpoint, save_checkpoint
from model.config import ConfigError, ModelConfig, get_config
from model.loss import pdd_loss
from model.pdd import PDD, SecondCNNTeacher, build_model
from model.teachers import TeacherSpec
from pdd_batch.ingest.preprocess import PreprocessSpec

torch.set_num_threads(1)

# A random resnet18 (its own seed) in Teacher M's slot: levels 2, 3, 4, 4 → 128/256/512/512 ch.
SECOND_CNN = TeacherSpec("resnet18_m", "cnn", "random", "resnet18", seed=7)


def _model(**overrides) -> PDD:
    model = build_model(get_config("test", **overrides))
    assert isinstance(model, PDD)
    return model


def _grads_after_one_loss(model: PDD) -> dict[str, bool]:
    """Which head modules received a non-zero gradient from one training loss."""
    model.train()
    model.loss(torch.rand(2, 1, 64, 64)).total.backward()
    return {
        name: any(p.grad is not None and p.grad.abs().sum() > 0 for p in mod.parameters())
        for name, mod in model.head.named_children()
    }


def test_spec_fusion_trains_the_adapters_through_the_targets() -> None:
    got = _grads_after_one_loss(_model())
    assert all(got[f"up_dim_v_r{i}"] for i in (1, 2, 3, 4))


def test_detached_fusion_keeps_teacher_m_in_the_targets_but_does_not_train_their_adapters() -> None:
    spec, detached = _model(), _model(mamba_fusion="detach")
    x = torch.rand(2, 1, 64, 64)
    spec.eval()
    detached.eval()
    with torch.no_grad():
        for a, b in zip(spec(x).targets, detached(x).targets, strict=True):
            torch.testing.assert_close(a, b)  # same init, same targets; only gradients differ
    got = _grads_after_one_loss(detached)
    assert not any(got[f"up_dim_v_r{i}"] for i in (1, 2, 3))
    assert got["up_dim_v_r4"] and got["layer1"] and got["mlp"]  # MMU still feeds the students


def test_gated_out_fusion_distils_teacher_c_alone() -> None:
    model = _model(mamba_fusion="off")
    model.eval()
    x = torch.rand(2, 1, 64, 64)
    cnn, _ = model.teacher_features(x)
    with torch.no_grad():
        out = model(x)
    for target, y in zip(out.targets, cnn[:3], strict=True):
        torch.testing.assert_close(target, y)
    model.zero_grad()
    got = _grads_after_one_loss(model)
    assert not any(got[f"up_dim_v_r{i}"] for i in (1, 2, 3, 4)) and got["layer1"]


def test_diversity_weight_scales_only_the_diversity_term() -> None:
    model = _model()
    model.eval()
    with torch.no_grad():
        out = model(torch.rand(2, 1, 64, 64))
    base, half = pdd_loss(out), pdd_loss(out, diversity_weight=0.25)
    assert half.total == pytest.approx(float(base.total - 0.25 * base.diversity), rel=1e-5)
    light = _model(diversity_weight=0.25)  # loss_from_output: what train_step uses
    light.eval()
    torch.testing.assert_close(light.loss_from_output(out).total, half.total)


def test_a_cnn_fills_teacher_ms_slot_with_its_levels_2_to_4() -> None:
    model = _model(mamba_teacher=SECOND_CNN)
    assert isinstance(model.teacher_mamba, SecondCNNTeacher)
    assert model.teacher_mamba.channels == (128, 256, 512, 512)
    x = torch.rand(2, 1, 64, 64)
    _, mamba = model.teacher_features(x)
    assert [tuple(m.shape[1:]) for m in mamba] == [
        (128, 8, 8),
        (256, 4, 4),
        (512, 2, 2),
        (512, 2, 2),
    ]
    got = _grads_after_one_loss(model)
    assert all(got[f"up_dim_v_r{i}"] for i in (1, 2, 3, 4))


@pytest.mark.parametrize(
    "overrides",
    [
        {"mamba_fusion": "detach"},
        {"mamba_fusion": "off", "diversity_weight": 0.1},
        {"mamba_teacher": SECOND_CNN},
    ],
)
def test_new_fields_round_trip_through_json(overrides) -> None:
    cfg = get_config("test", **overrides)
    assert ModelConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


def test_defaults_are_pdd_spec_and_bad_values_name_the_key() -> None:
    cfg = get_config("test")
    assert (cfg.mamba_fusion, cfg.diversity_weight) == ("add", 0.5)
    with pytest.raises(ConfigError, match="mamba_fusion"):
        get_config("test", mamba_fusion="gate")
    with pytest.raises(ConfigError, match="diversity_weight"):
        get_config("test", diversity_weight=-1.0)
    with pytest.raises(ConfigError, match="heterogeneous"):
        get_config("rd4ad", image_size=64, mamba_teacher=SECOND_CNN)


@pytest.mark.parametrize(
    "overrides", [{"mamba_fusion": "off", "diversity_weight": 0.1}, {"mamba_teacher": SECOND_CNN}]
)
def test_checkpoint_of_a_new_config_loads_with_the_same_predictions(tmp_path, overrides) -> None:
    model = _model(**overrides)
    opt = torch.optim.Adam(model.trainable_parameters(), lr=1e-3)
    model.train()
    loss = model.loss(torch.rand(2, 1, 64, 64)).total
    loss.backward()
    opt.step()
    out = save_checkpoint(
        model, tmp_path / "ck", preprocessing=PreprocessSpec(image_size=64).to_dict()
    )
    meta = json.loads((out / CONFIG_FILE).read_text())
    assert meta["model_config"]["mamba_teacher"]["kind"] == model.config.mamba_teacher.kind
    loaded = load_checkpoint(out).model
    assert loaded.config == ModelConfig.from_dict(meta["model_config"])
    assert loaded.config.mamba_fusion == model.config.mamba_fusion
    x = torch.rand(2, 1, 64, 64)
    torch.testing.assert_close(loaded.predict(x).scores, model.predict(x).scores)


def test_lite0_c_is_lite0_with_teacher_m_gated_out() -> None:
    lite0, lite0_c = get_config("lite0"), get_config("lite0-c")
    assert lite0_c.mamba_fusion == "off" and lite0.mamba_fusion == "add"
    assert lite0_c.cnn_teacher == lite0.cnn_teacher and lite0_c.map_sigma == lite0.map_sigma
    assert lite0_c.name == "lite0-c"


def test_lite0_d_is_the_benchmarked_detach_variant() -> None:
    from tools.experiments.recipes import variant_config

    chosen = variant_config("pdd-lite0-sigma2-detach", 128)
    assert get_config("lite0-d") == ModelConfig.from_dict({**chosen.to_dict(), "name": "lite0-d"})


def test_train_commands_default_config_is_the_chosen_one() -> None:
    """``train`` selects by default (no --config); the default candidate, trained alone when
    there are too few normals to hold any out and kept unless the normals speak against it, is
    PDD as PDD_SPEC defines it: Teacher M's targets not detached, anomaly-map blur σ 4 px."""
    import inspect

    from jobs.selection import CANDIDATES, DEFAULT_CANDIDATE
    from pdd_batch.cli.train import train_command

    params = inspect.signature(train_command).parameters
    assert params["config"].default is None
    assert params["candidates"].default.split(",") == [*CANDIDATES]
    spec = get_config(DEFAULT_CANDIDATE)
    assert (spec.arch, spec.mamba_fusion, spec.map_sigma) == ("pdd", "add", 4.0)
