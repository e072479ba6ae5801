"""Shared fixtures: paths to ../shared (skip cleanly where absent), thread limits, and a site key
of each test's own (never the real ~/.config/pdd-batch/site.key)."""

from __future__ import annotations

import os
from collections.abc import Iterator
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


@pytest.fixture(scope="session", autouse=True)
def site_key_file(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Every test (and module fixture) keys with a site key in a private temp folder
    (``PDD_BATCH_KEY_FILE``), never the real ``~/.config/pdd-batch/site.key``."""
    from pdd_batch.ingest import keys

    folder = tmp_path_factory.mktemp("pdd-batch-config")
    folder.chmod(0o700)
    path = folder / "site.key"
    previous = os.environ.get(keys.KEY_FILE_ENV)
    os.environ[keys.KEY_FILE_ENV] = str(path)
    keys.clear_cache()
    yield path
    keys.clear_cache()
    if previous is None:
        os.environ.pop(keys.KEY_FILE_ENV, None)
    else:
        os.environ[keys.KEY_FILE_ENV] = previous


@pytest.fixture
def golden_dir() -> Path:
    return shared_path("golden")


@pytest.fixture
def shared_data() -> Path:
    return shared_path("data")
