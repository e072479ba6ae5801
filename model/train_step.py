"""One training step on cached teacher features, shared by PDD and the RD4AD baseline.

The teachers are frozen and training uses no augmentation, so their features are a pure function
of the image: ``feature_bank`` computes them once for the whole training set and each step runs
only the trainable head (``forward_from_features``). Both ``PDD`` and ``RD4AD`` offer
``teacher_features``/``forward_from_features``; the loss and the anomaly map are chosen here.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from model.anomaly_map import anomaly_map
from model.loss import pdd_loss
from model.outputs import AnomalyOutput, HeadOutput, LossParts

FeatureBank = tuple[list[Tensor], list[Tensor]]  # (cnn levels, mamba levels), each (N, C, H, W)


def loss_form(model: nn.Module) -> str:
    """The configured PDD loss form ("code" or "paper"); "code" when the config has none."""
    cfg = getattr(model, "config", None)
    return str(getattr(cfg, "loss_form", None) or getattr(cfg, "loss", None) or "code")


def compute_loss(model: nn.Module, out: HeadOutput) -> LossParts:
    """The model's own loss (``loss_from_output``) if it has one, else PDD's loss."""
    own = getattr(model, "loss_from_output", None)
    if own is not None:
        return own(out)
    return pdd_loss(out, form=loss_form(model))


def anomaly_from_output(model: nn.Module, out: HeadOutput, image_size: int) -> AnomalyOutput:
    """The model's own map (``anomaly_from_output``) if it has one, else PDD's ``anomaly_map``."""
    own = getattr(model, "anomaly_from_output", None)
    if own is not None:
        return own(out, image_size)
    sigma = float(getattr(getattr(model, "config", None), "map_sigma", 4.0))
    return anomaly_map(out, image_size, sigma=sigma)


@torch.no_grad()
def feature_bank(model: nn.Module, images: Tensor, batch_size: int = 16) -> FeatureBank:
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


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, feats: FeatureBank) -> LossParts:
    """Forward the head on cached features, backpropagate, step; returns detached loss parts."""
    out = model.forward_from_features(*feats)
    parts = compute_loss(model, out)
    optimizer.zero_grad(set_to_none=True)
    parts.total.backward()
    optimizer.step()
    return LossParts(*(p.detach() for p in parts))


@torch.no_grad()
def predict_from_features(
    model: nn.Module, bank: FeatureBank, image_size: int, batch_size: int = 16
) -> AnomalyOutput:
    """Anomaly maps and scores from cached features, in eval mode (as ``model.predict``)."""
    was_training = model.training
    model.eval()
    maps, scores = [], []
    try:
        n = bank[0][0].shape[0]
        for start in range(0, n, batch_size):
            idx = torch.arange(start, min(start + batch_size, n), device=bank[0][0].device)
            res = anomaly_from_output(
                model, model.forward_from_features(*select(bank, idx)), image_size
            )
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


def trainable_state(model: nn.Module) -> dict[str, Any]:
    """State dict without the frozen teachers (what training changes, BN buffers included)."""
    return {
        k: v.detach().clone()
        for k, v in model.state_dict().items()
        if not k.startswith(("teacher_cnn.", "teacher_mamba."))
    }
