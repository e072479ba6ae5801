"""PDD (Manifold-Prior Diverse Distillation) in pure PyTorch.

Importable with only torch, timm, numpy and safetensors installed: no Ray, pydicom, CUDA or
mamba-ssm needed (the CUDA scan kernel is probed lazily in ``model.scan``). The public names
below are imported lazily on first use, so ``import model`` itself loads nothing heavy.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "PDD": "model.pdd",
    "build_model": "model.pdd",
    "ModelConfig": "model.config",
    "ConfigError": "model.config",
    "get_config": "model.config",
    "config_names": "model.config",
    "TeacherSpec": "model.teachers",
    "Teacher": "model.teachers",
    "TeacherWeightsError": "model.teachers",
    "build_teacher": "model.teachers",
    "HeadOutput": "model.outputs",
    "AnomalyOutput": "model.outputs",
    "LossParts": "model.outputs",
    "LoadedModel": "model.checkpoint",
    "CheckpointError": "model.checkpoint",
    "save_checkpoint": "model.checkpoint",
    "load_checkpoint": "model.checkpoint",
    "set_calibration": "model.checkpoint",
    "default_model_path": "model.default",
    "default_model_paths": "model.default",
}

__all__ = [
    "AnomalyOutput",
    "CheckpointError",
    "ConfigError",
    "HeadOutput",
    "LoadedModel",
    "LossParts",
    "ModelConfig",
    "PDD",
    "Teacher",
    "TeacherSpec",
    "TeacherWeightsError",
    "build_model",
    "build_teacher",
    "config_names",
    "default_model_path",
    "default_model_paths",
    "get_config",
    "load_checkpoint",
    "save_checkpoint",
    "set_calibration",
]

if TYPE_CHECKING:  # pragma: no cover - for type checkers and IDEs only
    from model.checkpoint import (
        CheckpointError,
        LoadedModel,
        load_checkpoint,
        save_checkpoint,
        set_calibration,
    )
    from model.config import ConfigError, ModelConfig, config_names, get_config
    from model.default import default_model_path, default_model_paths
    from model.outputs import AnomalyOutput, HeadOutput, LossParts
    from model.pdd import PDD, build_model
    from model.teachers import Teacher, TeacherSpec, TeacherWeightsError, build_teacher


def __getattr__(name: str) -> Any:
    """Import a public name from its module on first access."""
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'model' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
