"""One training step on cached teacher features, shared by PDD and the RD4AD baseline.

The teachers are frozen and training uses no augmentation, so their features are a pure function
of the image: ``feature_bank`` computes them once for the whole training set and each step runs
only the trainable head (``forward_from_features``). Both ``PDD`` and ``RD4AD`` offer
``teacher_features``/``forward_from_features`` and their own ``loss_from_output`` and
``anomaly_from_output``.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from model.outputs import AnomalyOutput, LossParts

if TYPE_CHECKING:  # pragma: no cover - annotations only
    from model.pdd import PDD
    from model.rd4ad import RD4AD

FeatureBank = tuple[list[Tensor], list[Tensor]]  # (cnn levels, mamba levels), each (N, C, H, W)


@torch.no_grad()
def feature_bank(model: PDD | RD4AD, images: Tensor, batch_size: int = 16) -> FeatureBank:
    """Teacher features of all ``images`` (N, 1|3, S, S), computed once in batches.

    Returns:
        (cnn, mamba): lists of (N, C_l, H_l, W_l) tensors on the images' device (mamba empty for
        models with no mamba teacher).
    """
    cnn_parts: list[list[Tensor]] = []
    mamba_parts: list[list[Tensor]] = []
    for start in range(0, images.shape[0], batch_size):
        cnn, mamba = model.teacher_features(images[start : start + batch_size])
        cnn_parts.append([t.detach() for t in cnn])
        mamba_parts.append([t.detach() for t in mamba])
    cnn_bank = [torch.cat(level, 0) for level in zip(*cnn_parts, strict=True)]
    mamba_bank = [torch.cat(level, 0) for level in zip(*mamba_parts, strict=True)]
    return cnn_bank, mamba_bank


def select(bank: FeatureBank, index: Tensor) -> FeatureBank:
    """Rows ``index`` of every level of a feature bank."""
    cnn, mamba = bank
    return [t[index] for t in cnn], [t[index] for t in mamba]


def train_step(
    model: PDD | RD4AD, optimizer: torch.optim.Optimizer, feats: FeatureBank
) -> LossParts:
    """Forward the head on cached features, backpropagate, step; returns detached loss parts."""
    parts = model.loss_from_output(model.forward_from_features(*feats))
    optimizer.zero_grad(set_to_none=True)
    parts.total.backward()
    optimizer.step()
    return LossParts(*(p.detach() for p in parts))


@torch.no_grad()
def predict_from_features(
    model: PDD | RD4AD, bank: FeatureBank, image_size: int, batch_size: int = 16
) -> AnomalyOutput:
    """Anomaly maps and scores from cached features, in eval mode (as ``model.predict``)."""
    was_training = model.training
    model.eval()
    maps, scores = [], []
    try:
        n = bank[0][0].shape[0]
        for start in range(0, n, batch_size):
            idx = torch.arange(start, min(start + batch_size, n), device=bank[0][0].device)
            out = model.forward_from_features(*select(bank, idx))
            res = model.anomaly_from_output(out, image_size)
            maps.append(res.maps)
            scores.append(res.scores)
    finally:
        model.train(was_training)
    return AnomalyOutput(maps=torch.cat(maps), scores=torch.cat(scores))


def make_optimizer(
    params: Iterable[nn.Parameter], lr: float = 2e-3, betas: Sequence[float] = (0.5, 0.999)
) -> torch.optim.Adam:
    """Adam as in PDD_SPEC §4 (no weight decay)."""
    return torch.optim.Adam(params, lr=lr, betas=(float(betas[0]), float(betas[1])))


def make_scheduler(
    optimizer: torch.optim.Optimizer, t_max: int = 40, eta_min: float = 2e-4
) -> torch.optim.lr_scheduler.CosineAnnealingLR:
    """CosineAnnealingLR stepped once per epoch (PDD_SPEC §4)."""
    return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=t_max, eta_min=eta_min)


def trainable_state(model: nn.Module) -> dict[str, Tensor]:
    """State dict without the frozen teachers (what training changes, BN buffers included)."""
    return {
        k: v.detach().clone()
        for k, v in model.state_dict().items()
        if not k.startswith(("teacher_cnn.", "teacher_mamba."))
    }
