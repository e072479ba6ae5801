"""Teacher weights: reading a state dict file and loading it strictly into a timm model.

Every error here is a ``TeacherWeightsError`` that names the file and the keys; nothing loads
with ``strict=False`` and nothing falls back to random weights. A leaf of ``model.teachers`` and
``model.efficientnet_lite`` (it imports neither).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn


class TeacherWeightsError(RuntimeError):
    """Teacher weights are missing, unreadable, mismatched, or not the recorded ones."""


def read_state_dict(path: str | Path) -> dict[str, Tensor]:
    """Read a .safetensors or torch state dict (unwrapping ``state_dict``/``model`` keys)."""
    path = Path(path)
    if not path.is_file():
        raise TeacherWeightsError(f"teacher weights file not found: {path}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state: Any = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - re-raised with the file named
        raise TeacherWeightsError(f"cannot read teacher weights {path}: {exc}") from exc
    for wrapper in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise TeacherWeightsError(f"{path} does not hold a state dict of tensors")
    return dict(state)


def full_model_shapes(arch: str) -> dict[str, tuple[int, ...]]:
    """Key → shape of the full (classifier) timm model, built on the meta device (no memory)."""
    import timm

    with torch.device("meta"):
        full = timm.create_model(arch, pretrained=False)
    return {k: tuple(v.shape) for k, v in full.state_dict().items()}


def load_strict(model: nn.Module, state: dict[str, Tensor], arch: str, origin: str) -> None:
    """Load timm-named ``state`` into a features_only ``model``, strictly.

    Keys of the full classifier model that the features model drops (e.g. ``fc.*``) are
    accepted and ignored; any other missing or unexpected key or shape mismatch raises
    ``TeacherWeightsError`` naming ``origin`` and the keys.
    """
    own = model.state_dict()
    full = full_model_shapes(arch)
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(full) - set(own))
    bad_shape = sorted(
        k for k in set(state) & set(own) if tuple(state[k].shape) != tuple(own[k].shape)
    )
    if missing or unexpected or bad_shape:
        raise TeacherWeightsError(
            f"{origin} does not match timm '{arch}': missing keys {missing[:8]}"
            f"{' ...' if len(missing) > 8 else ''}, unexpected keys {unexpected[:8]}"
            f"{' ...' if len(unexpected) > 8 else ''}, shape mismatches {bad_shape[:8]}"
        )
    model.load_state_dict({k: state[k] for k in own}, strict=True)
