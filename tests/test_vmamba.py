"""VMamba v0 teacher: key manifest, golden reproduction, strict loading, feature shapes."""

from __future__ import annotations

import hashlib
import json
import pickle
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from model.golden.__main__ import main as golden_main
from model.golden.vmamba import check_vmamba, key_mismatches
from model.vmamba import (
    VMambaConfigError,
    VMambaWeightsError,
    VSSMConfig,
    load_vmamba_checkpoint,
    vmamba_small_fixture,
    vmamba_tiny_v0,
)

# Old (pre-rename) VMamba names -> ours, inverted to write "old" checkpoints.
OLD_NAMES = [
    ("patch_embed.0.", "patch_embed.proj."),
    ("patch_embed.2.", "patch_embed.norm."),
    (".norm.", ".ln_1."),
    (".op.", ".self_attention."),
    (".downsample.1.", ".downsample.norm."),
    (".downsample.2.", ".downsample.reduction."),
    ("classifier.norm.", "norm."),
    ("classifier.head.", "head."),
]


def _to_old_name(key: str) -> str:
    for new, old in OLD_NAMES:
        if new.startswith(".") and ".blocks." in key and new in key:
            key = key.replace(new, old, 1)
        elif key.startswith(new):
            key = old + key[len(new) :]
        elif new.startswith(".downsample") and new in key:
            key = key.replace(new, old)
    return key


@pytest.fixture(autouse=True)
def one_thread():
    """One torch thread: on shared CI cores, two threads per small op oversubscribe badly."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _seeded_small_state(seed: int = 3) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    return {k: v.clone() for k, v in vmamba_small_fixture().state_dict().items()}


def test_tiny_keys_match_golden_manifest(golden_dir: Path) -> None:
    manifest = json.loads((golden_dir / "vmamba_tiny_v0_keys.json").read_text())
    with torch.device("meta"):
        tiny, small = vmamba_tiny_v0(), vmamba_small_fixture()
    assert key_mismatches(tiny, manifest["vssm_classifier"]) == 0
    assert key_mismatches(small, manifest["small_fixture_vssm_classifier"]) == 0
    assert sum(p.numel() for p in tiny.parameters()) == manifest["num_params"]


@pytest.mark.realdata
def test_small_fixture_reproduces_golden(golden_dir: Path) -> None:
    checks = check_vmamba(golden_dir)
    names = {c.name for c in checks}
    assert {"vmamba_small/feat0", "vmamba_small/feat3", "vmamba_small/logits"} <= names
    failed = [c for c in checks if not c.passed]
    assert not failed, failed


def test_golden_main_rejects_bad_arguments(tmp_path: Path) -> None:
    assert golden_main([]) == 2
    assert golden_main([str(tmp_path / "absent")]) == 2


@pytest.mark.parametrize("builder", [vmamba_small_fixture])
def test_feature_info_matches_features(builder) -> None:
    model = builder().eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        feats = model.forward_features(x)
    assert len(feats) == len(model.feature_info) == 4
    for f, info in zip(feats, model.feature_info, strict=True):
        assert f.shape == (2, info["num_chs"], 64 // info["reduction"], 64 // info["reduction"])


@pytest.mark.slow
def test_tiny_features_at_256(golden_dir: Path) -> None:
    manifest = json.loads((golden_dir / "vmamba_tiny_v0_keys.json").read_text())
    expected = manifest["pdd_features_for_256x256_input"]["shapes_for_batch_B"]
    torch.manual_seed(0)
    model = vmamba_tiny_v0().eval()
    assert model.feature_info == [
        {"num_chs": 192, "reduction": 8},
        {"num_chs": 384, "reduction": 16},
        {"num_chs": 768, "reduction": 32},
        {"num_chs": 768, "reduction": 32},
    ]
    with torch.no_grad():
        feats = model.forward_features(torch.rand(1, 3, 256, 256))
    assert [list(f.shape) for f in feats] == [[1, *s[1:]] for s in expected]
    assert all(torch.isfinite(f).all() for f in feats)


@pytest.mark.parametrize("zipfile", [True, False], ids=["zip", "legacy"])
def test_pth_with_old_names_loads_via_renames(tmp_path: Path, zipfile: bool) -> None:
    state = _seeded_small_state()
    old = {_to_old_name(k): v for k, v in state.items()}
    assert "layers.0.blocks.0.ln_1.weight" in old and "head.weight" in old
    assert "layers.0.downsample.reduction.weight" in old and "patch_embed.proj.weight" in old
    path = tmp_path / "old.pth"
    # the official layout: {"model": state_dict, "epoch": n}, plain data that weights_only reads
    torch.save({"model": old, "epoch": 292}, path, _use_new_zipfile_serialization=zipfile)
    model = load_vmamba_checkpoint(vmamba_small_fixture(), path)
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k


class TrainConfig:
    """Stands for the yacs config object that full VMamba training checkpoints carry."""

    def __init__(self) -> None:
        self.lr = 1e-3


class RunsCode:
    """A pickled object whose loading would run a command if unpickled unsafely."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        import os

        return (os.system, (f"touch {self.marker}",))


def _file_with_objects(path: Path, layout: str, marker: Path) -> None:
    """A .pth holding objects beside the weights; ``header``: a crafted legacy file whose first
    record (torch's magic number) is itself a code-running pickle, the classic exploit of a
    loader that reads legacy files with plain ``pickle.load``."""
    if layout == "header":
        legacy_magic = 0x1950A86A20F9469CFC6C
        path.write_bytes(pickle.dumps(RunsCode(marker), 2) + pickle.dumps(legacy_magic, 2))
        return
    kind, extra = layout.split("-")
    state = _seeded_small_state(seed=8)
    ckpt = {"model": {_to_old_name(k): v for k, v in state.items()}, "epoch": 292}
    ckpt[extra] = RunsCode(marker) if extra == "hook" else TrainConfig()
    torch.save(ckpt, path, _use_new_zipfile_serialization=kind == "zip")


@pytest.mark.parametrize(
    "layout", ["zip-hook", "legacy-hook", "header", "zip-config", "legacy-config"]
)
def test_pth_holding_objects_is_refused_and_runs_nothing(tmp_path: Path, layout: str) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "vssmtiny_ckpt_epoch_292.pth"
    _file_with_objects(path, layout, marker)
    model = vmamba_small_fixture()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(VMambaWeightsError) as err:
        load_vmamba_checkpoint(model, path)
    msg = str(err.value)
    assert str(path) in msg and "refused" in msg
    assert ".safetensors" in msg and "weights_only=True" in msg  # says which formats are accepted
    assert not marker.exists()
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_wrong_sha256_is_refused_before_the_file_is_parsed(tmp_path: Path) -> None:
    path = tmp_path / "w.pth"
    path.write_bytes(b"not a checkpoint")  # parsing it would fail with another message
    with pytest.raises(VMambaWeightsError, match="sha256") as err:
        load_vmamba_checkpoint(vmamba_small_fixture(), path, sha256="0" * 64)
    assert "w.pth" in str(err.value) and "not read" in str(err.value)
    good = tmp_path / "good.safetensors"
    save_file(_seeded_small_state(seed=4), str(good))
    digest = hashlib.sha256(good.read_bytes()).hexdigest()
    load_vmamba_checkpoint(vmamba_small_fixture(), good, sha256=digest)


def test_safetensors_loads_and_changes_outputs(tmp_path: Path) -> None:
    state = _seeded_small_state(seed=5)
    path = tmp_path / "w.safetensors"
    save_file(state, str(path))
    torch.manual_seed(6)
    model = vmamba_small_fixture().eval()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        before = model.forward_features(x)[0].clone()
        load_vmamba_checkpoint(model, path)
        after = model.forward_features(x)[0]
    assert not torch.allclose(before, after)
    assert torch.equal(
        model.state_dict()["layers.0.blocks.0.op.A_logs"], state["layers.0.blocks.0.op.A_logs"]
    )


@pytest.mark.parametrize("fault", ["missing", "unexpected", "shape"])
def test_strict_load_errors_name_file_and_key(tmp_path: Path, fault: str) -> None:
    state = _seeded_small_state()
    key = "layers.1.blocks.0.op.Ds"
    if fault == "missing":
        del state[key]
    elif fault == "unexpected":
        key = "layers.0.blocks.0.op.extra_bias"
        state[key] = torch.zeros(3)
    else:
        state[key] = torch.zeros(7)
    path = tmp_path / f"bad_{fault}.pth"
    torch.save(state, path)
    model = vmamba_small_fixture()
    reference = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(VMambaWeightsError, match=fault if fault != "shape" else "shape") as err:
        load_vmamba_checkpoint(model, path)
    assert str(path) in str(err.value) and key in str(err.value)
    assert all(torch.equal(v, reference[k]) for k, v in model.state_dict().items())


def test_unreadable_or_absent_checkpoint(tmp_path: Path) -> None:
    with pytest.raises(VMambaWeightsError, match="not found"):
        load_vmamba_checkpoint(vmamba_small_fixture(), tmp_path / "absent.pth")
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(VMambaWeightsError, match="junk.pth"):
        load_vmamba_checkpoint(vmamba_small_fixture(), junk)


def test_config_errors_name_the_key() -> None:
    with pytest.raises(VMambaConfigError, match="dims"):
        VSSMConfig(dims=0)
    with pytest.raises(VMambaConfigError, match="depths"):
        VSSMConfig(depths=())


def test_forward_features_rejects_wrong_channels() -> None:
    with pytest.raises(ValueError, match="expected"):
        vmamba_small_fixture().forward_features(torch.zeros(1, 1, 32, 32))


def test_odd_spatial_size_is_padded() -> None:
    model = vmamba_small_fixture().eval()
    with torch.no_grad():
        feats = model.forward_features(torch.randn(1, 3, 36, 36))  # 9x9 after the patch embed
    assert [tuple(f.shape[-2:]) for f in feats] == [(5, 5), (3, 3), (2, 2), (2, 2)]
