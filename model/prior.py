"""MPA: the manifold prior ("mlp" in the reference) added to the prior-guided student's path."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn


class ManifoldPrior(nn.Module):
    """Project the fused deepest feature f_t into two priors for decoder stages 2 and 3.

    s = GELU(BN(conv1×1 c_in→c_in//2 (f_t))); p1 = conv1×1 (s) → c1 channels, p2 = conv1×1 (s)
    → c2 channels; each is resized bilinearly (align_corners=False) to the spatial size of the
    decoder output it is added to. Key names: ``shared_transform.0/1``, ``branch1``, ``branch2``.

    Attributes:
        target_sizes: optional fixed ``[(h1, w1), (h2, w2)]`` overriding the run-time sizes (the
            reference hard-codes [(16, 16), (32, 32)] for 256 px); not saved in the state dict.
    """

    def __init__(
        self,
        c_in: int,
        out_channels: tuple[int, int],
        target_sizes: list[tuple[int, int]] | None = None,
    ) -> None:
        super().__init__()
        mid = max(c_in // 2, 1)
        self.target_sizes = None if target_sizes is None else [tuple(s) for s in target_sizes]
        self.shared_transform = nn.Sequential(
            nn.Conv2d(c_in, mid, kernel_size=1, bias=False),
            nn.BatchNorm2d(mid),
            nn.GELU(),
        )
        self.branch1 = nn.Conv2d(mid, out_channels[0], kernel_size=1, bias=False)
        self.branch2 = nn.Conv2d(mid, out_channels[1], kernel_size=1, bias=False)

    def forward(
        self, x: Tensor, sizes: list[tuple[int, int]] | None = None
    ) -> tuple[Tensor, Tensor]:
        """Return the two priors for ``x`` (B, c_in, h, w).

        Args:
            x: fused deepest feature f_t.
            sizes: run-time target sizes; ``self.target_sizes`` wins when set.

        Returns:
            p1 (B, c1, *sizes[0]) and p2 (B, c2, *sizes[1]).
        """
        sizes = self.target_sizes if self.target_sizes is not None else sizes
        if sizes is None or len(sizes) != 2:
            raise ValueError(f"ManifoldPrior needs two target sizes, got {sizes!r}")
        s = self.shared_transform(x)  # (B, mid, h, w)
        p1 = F.interpolate(
            self.branch1(s), size=tuple(sizes[0]), mode="bilinear", align_corners=False
        )
        p2 = F.interpolate(
            self.branch2(s), size=tuple(sizes[1]), mode="bilinear", align_corners=False
        )
        return p1, p2
