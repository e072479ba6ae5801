"""RD4AD baseline (Deng & Li, CVPR 2022) built from the same parts as PDD, for fair comparisons.

One frozen CNN teacher (levels 1–3 are the targets), RD4AD's one-class bottleneck embedding (OCBE:
multi-scale fusion by strided 3×3 convs, then ResNet bottleneck blocks down to the deepest level),
and one de-ResNet student made of the same ``model.decoder.make_stage`` stages as PDD's students.
Loss: Σ_levels mean_b (1 − cos) over flattened maps (RD4AD). Anomaly map: PDD's
``model.anomaly_map`` on (targets, student, student), halved, i.e. exactly RD4AD's three-level
1 − cos map with the same upsampling and σ = 4 blur.

Channels follow the teacher: (c1, c2, c3, c4) → OCBE fuses (c1, c2, c3) into 3·c3 channels at
level 3's size, then bottleneck blocks (width c4/2, as wide-ResNet) to c4 at level 4's size;
student stages c4→c3→c2→c1. With wide_resnet50_2 these are RD4AD's 3072 → 2048 numbers.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
from torch import Tensor, nn

from model.anomaly_map import anomaly_map
from model.config import ModelConfig
from model.decoder import init_distillation_weights, make_stage
from model.loss import cosine_sum
from model.outputs import AnomalyOutput, HeadOutput, LossParts
from model.precision import autocast
from model.teachers import Teacher, build_teacher

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _conv_bn_relu(c_in: int, c_out: int, stride: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
    )


class Bottleneck(nn.Module):
    """ResNet bottleneck (1×1 → 3×3 stride s → 1×1, BN, ReLU after the residual sum)."""

    def __init__(self, c_in: int, width: int, c_out: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, c_out, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(c_out)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or c_in != c_out:
            self.downsample = nn.Sequential(
                nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False), nn.BatchNorm2d(c_out)
            )

    def forward(self, x: Tensor) -> Tensor:
        """(B, c_in, H, W) → (B, c_out, H/s, W/s)."""
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        identity = x if self.downsample is None else self.downsample(x)
        return self.relu(out + identity)


class OCBE(nn.Module):
    """RD4AD's one-class bottleneck embedding: fuse levels 1–3, compress to one level-4 map."""

    def __init__(self, channels: Sequence[int], blocks: int = 3) -> None:
        super().__init__()
        c1, c2, c3, c4 = channels
        self.down1 = nn.Sequential(_conv_bn_relu(c1, c2, 2), _conv_bn_relu(c2, c3, 2))
        self.down2 = _conv_bn_relu(c2, c3, 2)
        width = max(c4 // 2, 1)
        layers = [Bottleneck(3 * c3, width, c4, stride=2)]
        layers += [Bottleneck(c4, width, c4) for _ in range(blocks - 1)]
        self.bn_layer = nn.Sequential(*layers)

    def forward(self, feats: Sequence[Tensor]) -> Tensor:
        """Levels (B, c_i, H/2^(i+1), W/2^(i+1)), i = 1..3 → (B, c4, H/32, W/32)."""
        fused = torch.cat([self.down1(feats[0]), self.down2(feats[1]), feats[2]], dim=1)
        return self.bn_layer(fused)  # (B, c4, H/32, W/32)


class RD4ADHead(nn.Module):
    """The trainable part: OCBE + one de-ResNet student (``layer1..3`` as in PDD's head)."""

    def __init__(self, channels: Sequence[int], blocks_per_stage: int = 2, ocbe_blocks: int = 3):
        super().__init__()
        c1, c2, c3, c4 = (int(c) for c in channels)
        self.bn = OCBE((c1, c2, c3, c4), ocbe_blocks)
        self.layer1 = make_stage(c4, c3, blocks_per_stage)
        self.layer2 = make_stage(c3, c2, blocks_per_stage)
        self.layer3 = make_stage(c2, c1, blocks_per_stage)
        init_distillation_weights(self)

    def forward(self, cnn_feats: Sequence[Tensor]) -> HeadOutput:
        """Teacher levels 1–4 (level 4 unused, as in RD4AD) → HeadOutput(t, s, s)."""
        targets = list(cnn_feats[:3])
        a = self.layer1(self.bn(targets))  # (B, c3, H/16, W/16)
        b = self.layer2(a)  # (B, c2, H/8, W/8)
        student = [self.layer3(b), b, a]  # high-res first
        return HeadOutput(targets=targets, student1=student, student2=student)


class RD4AD(nn.Module):
    """RD4AD with PDD's interface (``teacher_features``, ``forward_from_features``, ``predict``).

    Attributes:
        config: the ``ModelConfig`` it was built from (``arch="rd4ad"``).
        teacher_cnn: the frozen CNN teacher.
        teacher_mamba: always None (kept so code written for PDD can treat both alike).
        head: ``RD4ADHead``, the only trainable part.
    """

    def __init__(self, config: ModelConfig, teacher: Teacher, blocks_per_stage: int = 2) -> None:
        super().__init__()
        self.config = config
        self.image_size = int(config.image_size)
        self.teacher_cnn = teacher
        self.teacher_mamba = None
        self.head = RD4ADHead(teacher.channels, blocks_per_stage)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def normalise(self, x: Tensor) -> Tensor:
        """(B, 1|3, S, S) in [0, 1] → (B, 3, S, S) ImageNet-normalised."""
        if x.dim() != 4 or x.shape[1] not in (1, 3):
            raise ValueError(f"RD4AD input must be (B, 1 or 3, S, S), got {tuple(x.shape)}")
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        return (x.float() - self.mean) / self.std

    def teacher_features(self, x: Tensor) -> tuple[list[Tensor], list[Tensor]]:
        """Frozen teacher features (CNN levels 1–4, no mamba levels) for caching."""
        return self.teacher_cnn(self.normalise(x)), []

    def forward_from_features(
        self, cnn_feats: Sequence[Tensor], mamba_feats: Sequence[Tensor] = ()
    ) -> HeadOutput:
        """Head on cached teacher features."""
        return self.head(cnn_feats)

    def forward(self, x: Tensor) -> HeadOutput:
        """(B, 1|3, S, S) in [0, 1] → HeadOutput."""
        cnn, mamba = self.teacher_features(x)
        return self.forward_from_features(cnn, mamba)

    def loss_from_output(self, out: HeadOutput) -> LossParts:
        """RD4AD loss Σ_levels mean_b (1 − cos); PDD-only parts are zero."""
        total = cosine_sum(out.targets, out.student1, form="paper")
        zero = total.new_zeros(())
        return LossParts(total=total, mse_s2_t=zero, cos_s2_t=total, mse_t_s1=zero, diversity=zero)

    def loss(self, x: Tensor) -> LossParts:
        """Training loss of a batch."""
        return self.loss_from_output(self(x))

    def anomaly_from_output(self, out: HeadOutput, image_size: int) -> AnomalyOutput:
        """RD4AD map: three-level 1 − cos sum, blurred (PDD's map counts the student twice)."""
        res = anomaly_map(out, image_size, sigma=float(self.config.map_sigma))
        return AnomalyOutput(maps=res.maps / 2, scores=res.scores / 2)

    @torch.no_grad()
    def predict(self, x: Tensor, precision: str = "fp32") -> AnomalyOutput:
        """Anomaly maps (B, S, S) and scores (B,) in eval mode; ``precision`` as in PDD.predict."""
        was_training = self.training
        self.eval()
        try:
            with autocast(x.device, precision):
                out = self(x)
            return self.anomaly_from_output(out, x.shape[-1])
        finally:
            self.train(was_training)

    def trainable_parameters(self) -> Iterator[nn.Parameter]:
        """Parameters of the head (the teacher is frozen)."""
        return self.head.parameters()


def build_rd4ad(config: ModelConfig, stored_teachers: dict[str, Path] | None = None) -> RD4AD:
    """Build RD4AD from a ``ModelConfig`` (its CNN teacher; a mamba teacher, if any, is unused).

    ``stored_teachers``: as in ``model.pdd.build_model`` (only "cnn" is used).
    """
    teacher = build_teacher(config.cnn_teacher, (stored_teachers or {}).get("cnn"))
    with torch.random.fork_rng(devices=[]):  # seeded head init; the caller's RNG is untouched
        torch.manual_seed(int(config.head_seed))
        return RD4AD(config, teacher, config.blocks_per_stage)
