"""Shared fixtures: paths to ../shared (skip cleanly where absent) and thread limits."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("PDD_SHARED", REPO_ROOT.parent / "shared"))

# Two cores on CI: keep BLAS/torch from oversubscribing when Ray workers run beside the tests.
os.environ.setdefault("OMP_NUM_THREADS", "2")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")


def shared_path(*parts: str) -> Path:
    """A path under ../shared, or skip the test cleanly when it is absent."""
    p = SHARED.joinpath(*parts)
    if not p.exists():
        pytest.skip(f"shared data not present: {p}")
    return p


@pytest.fixture
def golden_dir() -> Path:
    return shared_path("golden")


@pytest.fixture
def shared_data() -> Path:
    return shared_path("data")
