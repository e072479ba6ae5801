"""PDD training loss (PDD_SPEC §2): distillation to the fused targets plus student diversity."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from model.outputs import HeadOutput, LossParts

W_MSE_S2_T = 0.02
W_COS_S2_T = 0.05
W_MSE_T_S1 = 0.02
W_DIVERSITY = 0.5
TAU_LOW = 0.75  # the 64² level: push the students apart above this cosine
TAU_HIGH = 0.30  # the 32² and 16² levels: pull the students together below this cosine
LOSS_FORMS = ("code", "paper")


def flat_cosine(a: Tensor, b: Tensor) -> Tensor:
    """Per-sample cosine between flattened maps: (B, C, H, W) × 2 → (B,)."""
    return F.cosine_similarity(a.reshape(a.shape[0], -1), b.reshape(b.shape[0], -1), dim=1)


def mse_sum(a: Sequence[Tensor], b: Sequence[Tensor]) -> Tensor:
    """Σ_levels mean((a − b)²)."""
    return torch.stack([F.mse_loss(x, y) for x, y in zip(a, b, strict=True)]).sum()


def cosine_sum(a: Sequence[Tensor], b: Sequence[Tensor], form: str = "code") -> Tensor:
    """Σ_levels mean_b cos (``form="code"``, the authors' code) or mean_b (1 − cos) ("paper")."""
    if form not in LOSS_FORMS:
        raise ValueError(f"loss form must be one of {LOSS_FORMS}, got {form!r}")
    cos = [flat_cosine(x, y) for x, y in zip(a, b, strict=True)]
    if form == "paper":
        cos = [1 - c for c in cos]
    return torch.stack([c.mean() for c in cos]).sum()


def diversity(s1: Sequence[Tensor], s2: Sequence[Tensor], low_dim_levels: int = 1) -> Tensor:
    """Diversity(S1, S2): mean max(0, cos − τ_low) on the first (high-res) ``low_dim_levels``
    levels, mean max(0, τ_high − cos) on the rest. Symmetric in its arguments."""
    terms = []
    for i, (x, y) in enumerate(zip(s1, s2, strict=True)):
        cos = flat_cosine(x, y)  # (B,)
        if i < low_dim_levels:
            terms.append(torch.clamp(cos - TAU_LOW, min=0).mean())
        else:
            terms.append(torch.clamp(TAU_HIGH - cos, min=0).mean())
    return torch.stack(terms).sum()


def _check(out: HeadOutput) -> None:
    n = len(out.targets)
    if n == 0 or len(out.student1) != n or len(out.student2) != n:
        raise ValueError(
            f"pdd_loss: need equal non-empty level lists, got {n}, {len(out.student1)}, "
            f"{len(out.student2)}"
        )
    for i, (t, s1, s2) in enumerate(zip(out.targets, out.student1, out.student2, strict=True)):
        if t.shape != s1.shape or t.shape != s2.shape:
            raise ValueError(
                f"pdd_loss: level {i} shapes differ: targets {tuple(t.shape)}, student1 "
                f"{tuple(s1.shape)}, student2 {tuple(s2.shape)}"
            )


def pdd_loss(
    out: HeadOutput, form: str = "code", diversity_weight: float = W_DIVERSITY
) -> LossParts:
    """The PDD loss 0.02·MSE(S2,T) + 0.05·Cos(S2,T) + 0.02·MSE(T,S1) + 0.5·Div(S1,S2).

    Args:
        out: head output; levels high-res first (the diversity's low-dim level is level 0).
        form: ``"code"`` (default, +cos as the authors' training code) or ``"paper"`` (1 − cos).
        diversity_weight: weight of Div(S1, S2) (PDD_SPEC: 0.5).

    Returns:
        LossParts with the weighted total and the unweighted parts.
    """
    _check(out)
    mse_s2_t = mse_sum(out.student2, out.targets)
    cos_s2_t = cosine_sum(out.student2, out.targets, form)
    mse_t_s1 = mse_sum(out.targets, out.student1)
    div = diversity(out.student2, out.student1)
    total = (
        W_MSE_S2_T * mse_s2_t
        + W_COS_S2_T * cos_s2_t
        + W_MSE_T_S1 * mse_t_s1
        + diversity_weight * div
    )
    return LossParts(total, mse_s2_t, cos_s2_t, mse_t_s1, div)
