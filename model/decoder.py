"""RD4AD's de-ResNet decoder: bottleneck blocks that upsample with transposed convolutions.

Module names follow the reference (``conv1..3``, ``bn1..3``, ``upsample.0/1``) so the PDD head's
state dict keys equal the golden manifest.
"""

from __future__ import annotations

from torch import Tensor, nn


class DeBottleneck(nn.Module):
    """One de-ResNet bottleneck: 1×1 → (ConvTranspose2d k2 s2 | 3×3) → 1×1, ReLU after the sum.

    conv1 (1×1) → BN → ReLU → conv2 → BN → ReLU → conv3 (1×1) → BN, plus the shortcut
    (``upsample``: ConvTranspose2d k2 s2 + BN when given, else identity), then ReLU. No conv bias.
    """

    def __init__(
        self, c_in: int, width: int, c_out: int, stride: int, upsample: nn.Module | None
    ) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, width, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        if stride == 2:
            self.conv2: nn.Module = nn.ConvTranspose2d(
                width, width, kernel_size=2, stride=2, bias=False
            )
        elif stride == 1:
            self.conv2 = nn.Conv2d(width, width, kernel_size=3, padding=1, bias=False)
        else:
            raise ValueError(f"DeBottleneck stride must be 1 or 2, got {stride}")
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, c_out, kernel_size=1, bias=False)
        self.bn3 = nn.BatchNorm2d(c_out)
        self.relu = nn.ReLU()
        self.upsample = upsample

    def forward(self, x: Tensor) -> Tensor:
        """(B, c_in, H, W) → (B, c_out, s·H, s·W)."""
        out = self.relu(self.bn1(self.conv1(x)))  # (B, width, H, W)
        out = self.relu(self.bn2(self.conv2(out)))  # (B, width, sH, sW)
        out = self.bn3(self.conv3(out))  # (B, c_out, sH, sW)
        identity = x if self.upsample is None else self.upsample(x)
        return self.relu(out + identity)


def stage_width(c_out: int) -> int:
    """Bottleneck width of a stage with ``c_out`` output channels.

    RD4AD/PDD build each stage with ``planes = c_out / 4`` (expansion 4) and wide-ResNet's
    ``width_per_group = 128``, so ``width = planes · 128/64 = c_out / 2`` (1024 → 512, 512 → 256,
    256 → 128 in the paper). The same rule sizes stages for other teachers.
    """
    return max(c_out // 2, 1)


def make_stage(c_in: int, c_out: int, blocks: int = 2) -> nn.Sequential:
    """A decoder stage ``c_in → c_out`` that doubles the spatial size.

    Block 0 upsamples (ConvTranspose2d k2 s2 in ``conv2`` and in the shortcut ``upsample.0``,
    followed by BN ``upsample.1``); blocks 1.. keep the size with a 3×3 conv.
    """
    if blocks < 1:
        raise ValueError(f"make_stage: blocks must be >= 1, got {blocks}")
    width = stage_width(c_out)
    shortcut = nn.Sequential(
        nn.ConvTranspose2d(c_in, c_out, kernel_size=2, stride=2, bias=False),
        nn.BatchNorm2d(c_out),
    )
    layers = [DeBottleneck(c_in, width, c_out, stride=2, upsample=shortcut)]
    for _ in range(blocks - 1):
        layers.append(DeBottleneck(c_out, width, c_out, stride=1, upsample=None))
    return nn.Sequential(*layers)


def init_distillation_weights(module: nn.Module) -> None:
    """RD4AD's (and PDD's) init: Kaiming-normal (fan_out, relu) for Conv2d, BN weight 1 / bias 0.

    As in RD4AD and the reference, the test is ``isinstance(m, nn.Conv2d)``, so the
    ConvTranspose2d layers keep PyTorch's default initialisation.
    """
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
