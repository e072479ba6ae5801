"""Checkpoints: save → load round trip, teacher provenance, strict and verified loading."""

from __future__ import annotations

import hashlib
import json
import pickle
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from model.checkpoint import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    CheckpointError,
    load_checkpoint,
    save_checkpoint,
    set_calibration,
)
from model.config import get_config
from model.pdd import build_model
from model.teachers import TeacherWeightsError
from pdd_batch.ingest.preprocess import PreprocessSpec

torch.set_num_threads(1)

PRE = PreprocessSpec(image_size=64).to_dict()
CAL = {
    "method": "fpr",
    "fpr": 0.05,
    "threshold": 3.25,
    "n_normals": 40,
    "split": "val",
    "data": "synthetic",
}


def _trained(config_name: str = "test", **overrides) -> torch.nn.Module:
    """A model after two optimiser steps, so weights and BN buffers differ from the init."""
    model = build_model(get_config(config_name, **overrides))
    opt = torch.optim.Adam(model.trainable_parameters(), lr=1e-3)
    model.train()
    for _ in range(2):
        loss = model.loss(torch.rand(2, 1, 64, 64)).total
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_round_trip_gives_identical_predictions(tmp_path) -> None:
    model = _trained()
    out = save_checkpoint(
        model, tmp_path / "ckpt", preprocessing=PRE, calibration=CAL, training={"epochs": 2}
    )
    x = torch.rand(3, 1, 64, 64)
    want = model.predict(x)
    loaded = load_checkpoint(out)
    assert not loaded.model.training
    got = loaded.model.predict(x)
    assert torch.equal(got.maps, want.maps) and torch.equal(got.scores, want.scores)
    assert loaded.preprocessing == PRE and loaded.calibration == CAL
    assert loaded.checkpoint_hash == _sha256(out / WEIGHTS_FILE)
    assert loaded.model_id == f"test-{loaded.checkpoint_hash[:12]}"
    assert loaded.meta["training"] == {"epochs": 2}


def test_weights_file_holds_only_the_head_and_its_bn_buffers(tmp_path) -> None:
    model = _trained()
    out = save_checkpoint(model, tmp_path, preprocessing=PRE)
    state = load_file(str(out / WEIGHTS_FILE))
    assert set(state) == {f"head.{k}" for k in model.head.state_dict()}
    key = "head.layer1.0.bn1.running_mean"
    assert torch.equal(state[key], model.head.state_dict()["layer1.0.bn1.running_mean"])
    assert state[key].abs().sum() > 0  # trained buffers, not the init


def test_config_json_describes_teachers_by_seed_or_hash(tmp_path) -> None:
    model = _trained()
    meta = json.loads(
        (save_checkpoint(model, tmp_path, preprocessing=PRE) / CONFIG_FILE).read_text()
    )
    assert meta["format_version"] == 1
    assert meta["checkpoint_hash"] == _sha256(tmp_path / WEIGHTS_FILE)
    cnn = meta["teachers"]["teacher_cnn"]
    assert cnn["weights"] == "random:seed=0" and cnn["source"] == "random"
    assert meta["model_config"]["cnn_teacher"]["sha256"] == cnn["state_sha256"]
    assert meta["model_config"]["mamba_teacher"]["sha256"] is not None
    assert set(meta["code_version"]) >= {"package", "git_commit", "torch"}


@pytest.fixture
def file_teacher_ckpt(tmp_path) -> tuple[Path, Path]:
    """A checkpoint whose CNN teacher comes from a local weights file."""
    import timm

    weights = tmp_path / "r18.pth"
    torch.manual_seed(11)
    torch.save(timm.create_model("resnet18").state_dict(), weights)
    model = _trained(cnn_source="file", cnn_weights=str(weights))
    ckpt = save_checkpoint(model, tmp_path / "ckpt", preprocessing=PRE)
    meta = json.loads((ckpt / CONFIG_FILE).read_text())
    assert meta["teachers"]["teacher_cnn"]["file_sha256"] == _sha256(weights)
    return ckpt, weights


def test_changed_teacher_weights_are_refused(file_teacher_ckpt) -> None:
    ckpt, weights = file_teacher_ckpt
    import timm

    torch.manual_seed(12)  # different weights, same keys and shapes
    torch.save(timm.create_model("resnet18").state_dict(), weights)
    with pytest.raises(TeacherWeightsError) as e:
        load_checkpoint(ckpt)
    assert "resnet18" in str(e.value) and str(weights) in str(e.value)


def test_moved_teacher_weights_load_when_pointed_to(file_teacher_ckpt, tmp_path) -> None:
    ckpt, weights = file_teacher_ckpt
    moved = tmp_path / "elsewhere.pth"
    weights.rename(moved)
    with pytest.raises(TeacherWeightsError, match="r18.pth"):
        load_checkpoint(ckpt)
    loaded = load_checkpoint(ckpt, teacher_weights={"cnn": str(moved)})
    assert loaded.config.cnn_teacher.weights == str(moved)


class _RunsCode:
    """Unpickling this runs a command (writes ``marker``)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        import os

        return (os.system, (f"touch {self.marker}",))


@pytest.fixture
def vmamba_file_ckpt(tmp_path) -> tuple[Path, Path]:
    """A checkpoint whose VMamba teacher comes from a .pth in the official layout."""
    from model.vmamba import vmamba_small_fixture

    weights = tmp_path / "vssm.pth"
    torch.manual_seed(13)
    torch.save({"model": vmamba_small_fixture().state_dict(), "epoch": 292}, weights)
    model = _trained(mamba_source="file", mamba_weights=str(weights))
    return save_checkpoint(model, tmp_path / "ckpt", preprocessing=PRE), weights


def test_replaced_teacher_file_is_refused_before_it_is_read(vmamba_file_ckpt, tmp_path) -> None:
    ckpt, weights = vmamba_file_ckpt
    marker = tmp_path / "pwned"
    # a crafted legacy torch file: its first record is a pickle that runs a command
    weights.write_bytes(
        pickle.dumps(_RunsCode(marker), 2) + pickle.dumps(0x1950A86A20F9469CFC6C, 2)
    )
    with pytest.raises(TeacherWeightsError, match="sha256") as e:
        load_checkpoint(ckpt)
    assert str(weights) in str(e.value) and "not read" in str(e.value)
    assert not marker.exists()


def test_teacher_file_converted_to_safetensors_loads(vmamba_file_ckpt, tmp_path) -> None:
    ckpt, weights = vmamba_file_ckpt
    converted = tmp_path / "vssm.safetensors"
    save_file(torch.load(weights, weights_only=True)["model"], str(converted))
    loaded = load_checkpoint(ckpt, teacher_weights={"mamba": str(converted)})
    assert loaded.config.mamba_teacher.weights == str(converted)
    other = tmp_path / "other.safetensors"  # a safe format, but not the recorded weights
    save_file({k: v + 1 for k, v in load_file(str(converted)).items()}, str(other))
    with pytest.raises(TeacherWeightsError, match="was recorded"):
        load_checkpoint(ckpt, teacher_weights={"mamba": str(other)})


def test_corrupt_weights_file_is_refused(tmp_path) -> None:
    out = save_checkpoint(_trained(), tmp_path, preprocessing=PRE)
    state = load_file(str(out / WEIGHTS_FILE))
    state["head.mlp.branch1.weight"] = state["head.mlp.branch1.weight"] * 2
    save_file(state, str(out / WEIGHTS_FILE))
    with pytest.raises(CheckpointError, match="checkpoint_hash"):
        load_checkpoint(out)


def _rewrite_weights(out: Path, state: dict[str, torch.Tensor]) -> None:
    """Replace the weights and re-sign them, so only the strict key check can catch it."""
    save_file(state, str(out / WEIGHTS_FILE))
    meta = json.loads((out / CONFIG_FILE).read_text())
    meta["checkpoint_hash"] = _sha256(out / WEIGHTS_FILE)
    (out / CONFIG_FILE).write_text(json.dumps(meta))


def test_missing_and_unexpected_keys_are_named(tmp_path) -> None:
    out = save_checkpoint(_trained(), tmp_path, preprocessing=PRE)
    state = load_file(str(out / WEIGHTS_FILE))
    dropped = {k: v for k, v in state.items() if k != "head.up_dim_v_r2.conv1.weight"}
    _rewrite_weights(out, dropped)
    with pytest.raises(CheckpointError, match="head.up_dim_v_r2.conv1.weight") as e:
        load_checkpoint(out)
    assert WEIGHTS_FILE in str(e.value)
    _rewrite_weights(out, {**state, "head.bogus": torch.zeros(2)})
    with pytest.raises(CheckpointError, match="head.bogus"):
        load_checkpoint(out)


def test_missing_config_json_is_a_clear_error(tmp_path) -> None:
    with pytest.raises(CheckpointError, match=CONFIG_FILE):
        load_checkpoint(tmp_path)


def test_set_calibration_rewrites_config_atomically(tmp_path) -> None:
    out = save_checkpoint(_trained(), tmp_path, preprocessing=PRE)
    before = json.loads((out / CONFIG_FILE).read_text())
    new = {**CAL, "threshold": 4.5}
    set_calibration(out, new)
    after = json.loads((out / CONFIG_FILE).read_text())
    assert after["calibration"] == new
    assert {k: v for k, v in after.items() if k != "calibration"} == {
        k: v for k, v in before.items() if k != "calibration"
    }
    # no temp file left; the test config's seeded VMamba is small, so a copy is stored
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [CONFIG_FILE, WEIGHTS_FILE, "teacher_mamba.safetensors"]
    )
    assert load_checkpoint(out).calibration == new
    with pytest.raises(ValueError, match="threshold"):
        set_calibration(out, {"method": "fpr"})


def test_rd4ad_round_trip(tmp_path) -> None:
    pytest.importorskip("model.rd4ad")
    model = build_model(get_config("test", arch="rd4ad"))
    x = torch.rand(2, 1, 64, 64)
    out = save_checkpoint(model, tmp_path, preprocessing=PRE)
    loaded = load_checkpoint(out)
    assert type(loaded.model) is type(model)
    assert torch.equal(loaded.model.predict(x).maps, model.predict(x).maps)


def test_default_model_path_is_a_checkpoint_or_says_how_to_get_one() -> None:
    from model.default import DEFAULT_MODEL_DIR, default_model_path

    if (DEFAULT_MODEL_DIR / CONFIG_FILE).is_file():
        assert default_model_path() == DEFAULT_MODEL_DIR
        assert (DEFAULT_MODEL_DIR / WEIGHTS_FILE).is_file()
    else:
        with pytest.raises(FileNotFoundError, match="pdd-batch train"):
            default_model_path()


def test_model_package_re_exports_the_public_api() -> None:
    import model
    from model import checkpoint, pdd

    assert model.build_model is pdd.build_model
    assert model.load_checkpoint is checkpoint.load_checkpoint
    assert set(model.__all__) <= set(dir(model))
    with pytest.raises(AttributeError):
        _ = model.no_such_name


def test_changed_teacher_input_normalisation_is_refused(tmp_path) -> None:
    out = save_checkpoint(_trained(), tmp_path, preprocessing=PRE)
    meta = json.loads((out / CONFIG_FILE).read_text())
    meta["teachers"]["teacher_cnn"]["input_mean"] = [0.5, 0.5, 0.5]  # as if trained that way
    (out / CONFIG_FILE).write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="teacher_cnn.*input_mean"):
        load_checkpoint(out)


def _other_vmamba_draw(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make seeded VMamba teachers come out different, as on another torch version."""
    import model.teachers as teachers
    from model.vmamba import VSSM

    original = teachers._seeded_build

    def other_draw(seed, builder, *args, **kwargs):
        module = original(seed, builder, *args, **kwargs)
        if isinstance(module, VSSM):
            with torch.no_grad():
                for p in module.parameters():
                    p.add_(0.01)
        return module

    monkeypatch.setattr(teachers, "_seeded_build", other_draw)


def test_stored_seeded_teacher_survives_another_seeded_draw(tmp_path, monkeypatch) -> None:
    model = _trained()
    x = torch.rand(2, 1, 64, 64)
    out = save_checkpoint(model, tmp_path / "ck", preprocessing=PRE)
    meta = json.loads((out / CONFIG_FILE).read_text())
    assert meta["teachers"]["teacher_mamba"]["stored_copy"]["file"] == "teacher_mamba.safetensors"
    assert "stored_copy" not in meta["teachers"]["teacher_cnn"]  # random ResNet-18: 45 MB
    _other_vmamba_draw(monkeypatch)
    loaded = load_checkpoint(out)
    assert "stored copy" in loaded.model.teacher_mamba.provenance["weights"]
    assert torch.equal(loaded.model.predict(x).maps, model.predict(x).maps)
    # without the copy, the other draw is caught by the recorded hash, not silently used
    (out / "teacher_mamba.safetensors").unlink()
    del meta["teachers"]["teacher_mamba"]["stored_copy"]
    (out / CONFIG_FILE).write_text(json.dumps(meta))
    with pytest.raises(TeacherWeightsError, match="not the weights this model was trained with"):
        load_checkpoint(out)


def test_missing_or_altered_teacher_copy_is_a_clear_error(tmp_path) -> None:
    out = save_checkpoint(_trained(), tmp_path / "ck", preprocessing=PRE)
    copy = out / "teacher_mamba.safetensors"
    state = load_file(str(copy))
    key = next(iter(state))
    state[key] = state[key] + 1
    save_file(state, str(copy))
    with pytest.raises(CheckpointError, match="teacher_mamba.safetensors: sha256 differs"):
        load_checkpoint(out)
    copy.unlink()
    with pytest.raises(CheckpointError, match="teacher copy missing"):
        load_checkpoint(out)
