"""PDD: two frozen teachers + the trainable ``PDDHead``, and ``build_model(config)``.

Input is float32 (B, 1|3, S, S) in [0, 1]; grey images are replicated to 3 channels and the
ImageNet mean/std normalisation happens inside, so every caller feeds the same [0, 1] slices
that ``pdd_batch.ingest.preprocess`` produces.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from model.anomaly_map import anomaly_map
from model.config import VMAMBA_WEIGHTS_ENV, ConfigError, ModelConfig
from model.head import PDDHead
from model.loss import pdd_loss
from model.outputs import AnomalyOutput, HeadOutput, LossParts
from model.precision import autocast
from model.teachers import Teacher, TeacherWeightsError, build_teacher

if TYPE_CHECKING:  # pragma: no cover - annotations only
    from model.rd4ad import RD4AD

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class PDD(nn.Module):
    """Manifold-Prior Diverse Distillation (PDD_SPEC §1).

    Attributes:
        config: the ``ModelConfig`` it was built from.
        image_size: the square input side S the model was configured for.
        teacher_cnn: frozen Teacher C (4 levels at reductions 4, 8, 16, 32).
        teacher_mamba: frozen Teacher M (4 levels at reductions 8, 16, 32, 32).
        head: the trainable ``PDDHead``.
    """

    def __init__(self, config: ModelConfig, teacher_cnn: Teacher, teacher_mamba: Teacher) -> None:
        super().__init__()
        self.config = config
        self.image_size = int(config.image_size)
        self.teacher_cnn = teacher_cnn
        self.teacher_mamba = teacher_mamba
        _check_teacher_geometry(teacher_cnn, teacher_mamba)
        with torch.random.fork_rng(devices=[]):  # seeded init; the caller's RNG is untouched
            torch.manual_seed(config.head_seed)
            self.head = PDDHead(
                cnn_channels=teacher_cnn.channels,
                mamba_channels=teacher_mamba.channels,
                adapter_reduction=config.adapter_reduction,
                blocks_per_stage=config.blocks_per_stage,
                mamba_fusion=config.mamba_fusion,
            )
        mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
        std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
        self.register_buffer("mean", mean, persistent=False)
        self.register_buffer("std", std, persistent=False)

    def normalise(self, x: Tensor) -> Tensor:
        """(B, 1|3, S, S) in [0, 1] → (B, 3, S, S) ImageNet-normalised.

        Raises:
            ValueError: the shape is not (B, 1 or 3, S, S) with S a multiple of 32.
        """
        if x.dim() != 4 or x.shape[1] not in (1, 3) or x.shape[-1] != x.shape[-2]:
            raise ValueError(f"PDD input must be (B, 1 or 3, S, S), got {tuple(x.shape)}")
        if x.shape[-1] % 32 or x.shape[0] == 0:
            raise ValueError(
                f"PDD input side must be a multiple of 32 and B > 0, got {tuple(x.shape)}"
            )
        if not x.is_floating_point():
            raise ValueError(f"PDD input must be float in [0, 1], got dtype {x.dtype}")
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)  # grey → RGB
        return (x.float() - self.mean) / self.std  # (B, 3, S, S)

    def teacher_features(self, x: Tensor) -> tuple[list[Tensor], list[Tensor]]:
        """Frozen teacher features, for caching during training.

        Args:
            x: (B, 1|3, S, S) in [0, 1].

        Returns:
            (cnn_feats, mamba_feats): 4 maps each, (B, C_i, S/r_i, S/r_i), without gradients.
        """
        xn = self.normalise(x)
        with torch.no_grad():
            return self.teacher_cnn(xn), self.teacher_mamba(xn)

    def forward_from_features(
        self, cnn_feats: Sequence[Tensor], mamba_feats: Sequence[Tensor]
    ) -> HeadOutput:
        """Run the trainable head on (cached) teacher features."""
        return self.head(cnn_feats, mamba_feats)

    def forward(self, x: Tensor) -> HeadOutput:
        """(B, 1|3, S, S) in [0, 1] → HeadOutput (targets, student1, student2), high-res first."""
        return self.forward_from_features(*self.teacher_features(x))

    def loss_from_output(self, out: HeadOutput) -> LossParts:
        """The PDD loss of a head output (form and diversity weight from the config)."""
        return pdd_loss(
            out, form=self.config.loss_form, diversity_weight=self.config.diversity_weight
        )

    def loss(self, x: Tensor) -> LossParts:
        """The PDD training loss of a batch of normal images (form from the config)."""
        return self.loss_from_output(self(x))

    def anomaly_from_output(self, out: HeadOutput, image_size: int) -> AnomalyOutput:
        """PDD's anomaly map of a head output, blurred with the config's ``map_sigma``."""
        return anomaly_map(out, image_size, sigma=float(self.config.map_sigma))

    @torch.no_grad()
    def predict(self, x: Tensor, precision: str = "fp32") -> AnomalyOutput:
        """Anomaly maps (B, S, S) and scores (B,), computed in eval mode.

        ``precision`` ("fp32" | "bf16") applies to the network forward only (model.precision).
        The previous train/eval mode is restored afterwards.
        """
        was_training = self.training
        self.eval()
        try:
            with autocast(x.device, precision):
                out = self(x)
            return self.anomaly_from_output(out, int(x.shape[-1]))
        finally:
            self.train(was_training)

    def trainable_parameters(self) -> Iterator[nn.Parameter]:
        """Parameters of the head (the teachers are frozen)."""
        return (p for p in self.head.parameters() if p.requires_grad)


class SecondCNNTeacher(Teacher):
    """A CNN in Teacher M's slot (a "heterogeneous pair"): its levels 2, 3, 4, 4, i.e. the
    reductions 8, 16, 32, 32 of VMamba's levels (each after its stage's downsample)."""

    def forward(self, x: Tensor) -> list[Tensor]:
        """(B, 3, H, W) ImageNet-normalised → 4 maps at H/8, H/16, H/32, H/32."""
        feats = super().forward(x)
        return [feats[1], feats[2], feats[3], feats[3]]


def second_teacher(teacher: Teacher) -> Teacher:
    """Teacher M from a built teacher: VMamba as is; a CNN re-levelled (``SecondCNNTeacher``)."""
    if teacher.spec.kind != "cnn":
        return teacher
    info = teacher.feature_info
    prov = {k: v for k, v in teacher.provenance.items() if k not in ("input_mean", "input_std")}
    norm = (teacher.provenance["input_mean"], teacher.provenance["input_std"])
    return SecondCNNTeacher(
        teacher.spec, teacher.backbone, [info[1], info[2], info[3], info[3]], prov, norm
    )


def _check_teacher_geometry(cnn: Teacher, mamba: Teacher) -> None:
    """PDD fuses CNN level i with VMamba level i at half (i ≤ 3) or equal (i = 4) resolution."""
    got_c = tuple(f["reduction"] for f in cnn.feature_info)
    got_m = tuple(f["reduction"] for f in mamba.feature_info)
    if got_c != (4, 8, 16, 32) or got_m != (8, 16, 32, 32):
        raise ConfigError(
            f"teacher reductions must be cnn (4, 8, 16, 32) and mamba (8, 16, 32, 32); got "
            f"cnn {got_c} ({cnn.spec.name}), mamba {got_m} ({mamba.spec.name})"
        )


def build_model(config: ModelConfig, stored_teachers: dict[str, Path] | None = None) -> PDD | RD4AD:
    """Build the model a config describes, teachers loaded strictly, on CPU.

    ``arch="pdd"`` gives ``PDD``; ``arch="rd4ad"`` dispatches to ``model.rd4ad.build_rd4ad``.
    ``stored_teachers`` maps a role ("cnn" | "mamba") to the stored copy of a seeded teacher
    (``build_teacher``; written by ``model.checkpoint.save_checkpoint``).

    Raises:
        ConfigError: unknown arch, or teachers whose geometry PDD cannot fuse.
        TeacherWeightsError: teacher weights missing or mismatched.
    """
    if config.arch == "rd4ad":
        try:
            from model.rd4ad import build_rd4ad
        except ImportError as exc:
            raise ConfigError(f"arch 'rd4ad' is not available: {exc}") from exc
        return build_rd4ad(config, stored_teachers)
    if config.arch != "pdd":
        raise ConfigError(f"arch must be 'pdd' or 'rd4ad', got {config.arch!r}")
    if config.mamba_teacher is None:
        raise ConfigError("mamba_teacher is required for arch='pdd'")
    for spec in (config.cnn_teacher, config.mamba_teacher):  # fail fast, before heavy builds
        if spec.source == "file" and not Path(str(spec.weights)).is_file():
            raise TeacherWeightsError(
                f"teacher '{spec.name}' weights file not found: {spec.weights}"
                + (f" (set ${VMAMBA_WEIGHTS_ENV})" if spec.kind == "mamba" else "")
            )
    stored = stored_teachers or {}
    model = PDD(
        config,
        build_teacher(config.cnn_teacher, stored.get("cnn")),
        second_teacher(build_teacher(config.mamba_teacher, stored.get("mamba"))),
    )
    log.info("built PDD '%s' (%d px)", config.name, config.image_size)
    return model
