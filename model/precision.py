"""Inference precision: ``"fp32"`` or ``"bf16"`` autocast for the teachers and students.

Only the network forward runs under autocast; anomaly maps and scores are always computed from
the features in float32/float64 (``model.anomaly_map``), so a bf16 run ranks images with full
score precision. The selective scan keeps its own float32 state either way (``model.scan``).
"""

from __future__ import annotations

import contextlib

import torch

PRECISION_DTYPES: dict[str, torch.dtype | None] = {"fp32": None, "bf16": torch.bfloat16}


def check_precision(precision: str) -> str:
    """``precision`` itself, or a ValueError naming the accepted values."""
    if precision not in PRECISION_DTYPES:
        raise ValueError(f"precision must be one of {tuple(PRECISION_DTYPES)}, got {precision!r}")
    return precision


def autocast(
    device: torch.device | str, precision: str = "fp32"
) -> contextlib.AbstractContextManager:
    """A context running the forward in ``precision`` on ``device`` (a no-op for fp32)."""
    dtype = PRECISION_DTYPES[check_precision(precision)]
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=dtype)
