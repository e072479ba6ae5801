"""The in-distribution check: is a slice like anything the model was trained on?

An anomaly model flags what differs from its training normals, and a slice of a level, body part
or contrast it never saw differs in everything: flagging it says nothing. So each model carries a
check fitted at train time on its training images. A slice is described by its CNN teacher's
features, average-pooled per level and concatenated (``pooled_features``, (B, D)), standardised
with the training mean/std; its distance is the mean Euclidean distance to its ``k`` nearest
training slices. The threshold is a high quantile (default 0.99) of the training slices' own
leave-one-out distances; a slice beyond it is ``out_of_distribution`` (not scored as normal or
flagged). Stored as ``ood.safetensors`` (mean, std, bank) beside the head weights.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor, nn

DEFAULT_QUANTILE = 0.99
DEFAULT_K = 3
MAX_BANK = 4096  # training slices kept in the bank (seeded subset beyond this)
FEATURE = "cnn teacher, per-level global average pool, concatenated, standardised"


def pool_levels(levels: Sequence[Tensor], which: Sequence[int] | None = None) -> Tensor:
    """Teacher feature maps [(B, C_l, H_l, W_l)] -> (B, sum C_l) pooled features, float32, of
    the levels ``which`` (indices; None: all)."""
    chosen = [levels[i] for i in which] if which is not None else list(levels)
    return torch.cat([t.float().mean(dim=(2, 3)) for t in chosen], dim=1)  # (B, D)


@contextmanager
def capture_teacher(model: nn.Module, which: Sequence[int] | None = None) -> Iterator[list[Tensor]]:
    """Collect the pooled CNN-teacher features (levels ``which``) of every forward run inside
    the block (a hook: the features the model computes anyway, no second teacher pass)."""
    found: list[Tensor] = []

    def hook(_m: nn.Module, _inp: object, out: Sequence[Tensor]) -> None:
        found.append(pool_levels(out, which).detach())

    handle = model.teacher_cnn.register_forward_hook(hook)
    try:
        yield found
    finally:
        handle.remove()


@dataclass(frozen=True)
class OODCheck:
    """A fitted check. ``mean``/``std`` (D,), ``bank`` (N, D) standardised training features."""

    mean: Tensor
    std: Tensor
    bank: Tensor
    threshold: float
    k: int = DEFAULT_K
    quantile: float = DEFAULT_QUANTILE
    levels: tuple[int, ...] | None = None  # teacher levels pooled (None: all)

    def distance(self, feats: Tensor) -> Tensor:
        """(B, D) pooled features -> (B,) mean distance to the k nearest training slices."""
        if feats.dim() != 2 or feats.shape[1] != self.bank.shape[1]:
            raise ValueError(
                f"OOD features must be (B, {self.bank.shape[1]}), got {tuple(feats.shape)}"
            )
        bank = self.bank.to(feats.device)
        z = (feats.float() - self.mean.to(feats.device)) / self.std.to(feats.device)  # (B, D)
        d = torch.cdist(z, bank)  # (B, N)
        k = min(self.k, bank.shape[0])
        return d.topk(k, dim=1, largest=False).values.mean(dim=1)  # (B,)

    def tensors(self) -> dict[str, Tensor]:
        """What ``ood.safetensors`` holds."""
        return {"mean": self.mean.cpu(), "std": self.std.cpu(), "bank": self.bank.cpu()}

    def info(self) -> dict[str, object]:
        """What ``config.json`` records beside the file."""
        return {
            "threshold": self.threshold,
            "k": self.k,
            "quantile": self.quantile,
            "n_train": int(self.bank.shape[0]),
            "dim": int(self.bank.shape[1]),
            "levels": list(self.levels) if self.levels is not None else None,
            "feature": FEATURE,
        }


def fit_ood(
    feats: Tensor,
    quantile: float = DEFAULT_QUANTILE,
    k: int = DEFAULT_K,
    seed: int = 0,
    groups: Tensor | None = None,
    levels: Sequence[int] | None = None,
) -> OODCheck:
    """Fit the check on (N, D) pooled training features (N >= 2).

    The threshold is the ``quantile`` of each training slice's mean distance to its ``k`` nearest
    training slices of *other* groups (leave-one-group-out), so it is not zero on the training set
    itself. ``groups`` (N,) names the image each row comes from: the augmented views of one image
    are near copies of each other, and a slice must be judged against other images, as a new
    slice will be; default: every row its own group. ``levels``: the teacher levels ``feats``
    pooled (recorded, so screening pools the same ones).
    """
    if feats.dim() != 2 or feats.shape[0] < 2:
        raise ValueError(f"fit_ood needs (N >= 2, D) features, got {tuple(feats.shape)}")
    feats = feats.float().cpu()
    groups = torch.arange(feats.shape[0]) if groups is None else torch.as_tensor(groups).cpu()
    if groups.shape != (feats.shape[0],) or len(torch.unique(groups)) < 2:
        raise ValueError("fit_ood: groups must give each of the N rows a group, at least two")
    if feats.shape[0] > MAX_BANK:
        gen = torch.Generator().manual_seed(seed)
        keep = torch.randperm(feats.shape[0], generator=gen)[:MAX_BANK]
        feats, groups = feats[keep], groups[keep]
    mean = feats.mean(dim=0)
    std = feats.std(dim=0).clamp_min(1e-6)
    bank = (feats - mean) / std  # (N, D)
    d = torch.cdist(bank, bank)  # (N, N)
    d[groups[:, None] == groups[None, :]] = float("inf")  # itself and its own views
    largest = int(torch.unique(groups, return_counts=True)[1].max())
    kk = max(1, min(k, bank.shape[0] - largest))  # every row has this many other-group rows
    loo = d.topk(kk, dim=1, largest=False).values.mean(dim=1)  # (N,)
    threshold = float(torch.quantile(loo, quantile))
    kept = tuple(int(i) for i in levels) if levels is not None else None
    return OODCheck(mean, std, bank, threshold, k, quantile, kept)


def ood_from_tensors(tensors: dict[str, Tensor], info: dict[str, object]) -> OODCheck:
    """Rebuild a check from ``ood.safetensors`` and its ``config.json`` record."""
    return OODCheck(
        mean=tensors["mean"],
        std=tensors["std"],
        bank=tensors["bank"],
        threshold=float(info["threshold"]),  # type: ignore[arg-type]
        k=int(info.get("k", DEFAULT_K)),  # type: ignore[arg-type]
        quantile=float(info.get("quantile", DEFAULT_QUANTILE)),  # type: ignore[arg-type]
        levels=tuple(info["levels"]) if info.get("levels") is not None else None,  # type: ignore[arg-type]
    )
