"""ECA: the efficient channel adapter that maps VMamba features onto the CNN's channels.

InA and MMU (PDD_SPEC §1) both use it. Module names match the reference's ``up_dim_v_rK`` keys.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn


class ChannelAdapter(nn.Module):
    """ECA for ``c_in → c_out``: a bottleneck with a dilated 3×3 and a projected residual.

    main = BN(conv1×1 mid→c_out) ∘ GELU∘BN(conv3×3 dil 2) ∘ GELU∘BN(conv1×1 c_in→mid),
    with ``mid = max(c_in, c_out) // reduction``; output = GELU(main + residual), where the
    residual is a bias-free 1×1 conv (no BN) when ``c_in != c_out`` and the identity otherwise.
    GELU is the exact (erf) form; no conv has a bias.
    """

    def __init__(self, c_in: int, c_out: int, reduction: int = 4) -> None:
        super().__init__()
        if c_in < 1 or c_out < 1 or reduction < 1:
            raise ValueError(f"ChannelAdapter: bad sizes c_in={c_in} c_out={c_out} r={reduction}")
        mid = max(max(c_in, c_out) // reduction, 1)
        self.c_in = c_in
        self.c_out = c_out
        self.conv1 = nn.Conv2d(c_in, mid, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(mid)
        self.conv2 = nn.Conv2d(mid, mid, kernel_size=3, padding=2, dilation=2, bias=False)
        self.bn2 = nn.BatchNorm2d(mid)
        self.conv3 = nn.Conv2d(mid, c_out, kernel_size=1, bias=False)
        self.bn3 = nn.BatchNorm2d(c_out)
        self.residual_proj = (
            nn.Conv2d(c_in, c_out, kernel_size=1, bias=False) if c_in != c_out else None
        )

    def forward(self, x: Tensor) -> Tensor:
        """Map ``x`` (B, c_in, H, W) to (B, c_out, H, W)."""
        out = F.gelu(self.bn1(self.conv1(x)))  # (B, mid, H, W)
        out = F.gelu(self.bn2(self.conv2(out)))  # (B, mid, H, W)
        out = self.bn3(self.conv3(out))  # (B, c_out, H, W)
        residual = x if self.residual_proj is None else self.residual_proj(x)
        return F.gelu(out + residual)
