"""Typed outputs of the PDD head, its loss and its anomaly map.

Every list of features is ordered high resolution first: at a 256 px input the three levels are
64², 32² and 16² (channels 256, 512, 1024 with the paper's teachers).
"""

from __future__ import annotations

from typing import NamedTuple

from torch import Tensor


class HeadOutput(NamedTuple):
    """The three feature pyramids the PDD head produces.

    Attributes:
        targets: fused teacher features f_b (InA), 3 tensors (B, C_l, H_l, W_l); not detached.
        student1: plain decoder path, 3 tensors shaped like ``targets``.
        student2: prior-guided (MPA) decoder path, 3 tensors shaped like ``targets``.
    """

    targets: list[Tensor]
    student1: list[Tensor]
    student2: list[Tensor]


class AnomalyOutput(NamedTuple):
    """Per-image anomaly maps and image scores.

    Attributes:
        maps: (B, H, W) float32 blurred anomaly maps at the input size.
        scores: (B,) float32 image scores (max of each map).
    """

    maps: Tensor
    scores: Tensor


class LossParts(NamedTuple):
    """The PDD training loss and its unweighted parts (scalars).

    Attributes:
        total: 0.02·mse_s2_t + 0.05·cos_s2_t + 0.02·mse_t_s1 + 0.5·diversity.
        mse_s2_t: MSE(student2, targets) summed over levels.
        cos_s2_t: cosine term between student2 and targets (``+cos`` or ``1 − cos`` by form).
        mse_t_s1: MSE(targets, student1) summed over levels.
        diversity: diversity loss between student1 and student2.
    """

    total: Tensor
    mse_s2_t: Tensor
    cos_s2_t: Tensor
    mse_t_s1: Tensor
    diversity: Tensor
