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

from model.weight_files import WeightFileError, read_weights


class TeacherWeightsError(RuntimeError):
    """Teacher weights are missing, unreadable, mismatched, or not the recorded ones."""


def read_state_dict(path: str | Path) -> dict[str, Tensor]:
    """Read a .safetensors or torch state dict (unwrapping ``state_dict``/``model`` keys).

    Only safetensors or ``torch.load(weights_only=True)`` (``model.weight_files``); a torch file
    holding other Python objects is refused, never unpickled.
    """
    path = Path(path)
    if not path.is_file():
        raise TeacherWeightsError(f"teacher weights file not found: {path}")
    try:
        state: Any = read_weights(path)
    except WeightFileError as exc:
        raise TeacherWeightsError(f"teacher weights: {exc}") from None
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
