"""Shared fixtures: paths to ../shared (skip cleanly where absent), thread limits, a site key
of each test's own (never the real ~/.config/pdd-batch/site.key), and Ray.

Every Ray cluster a test starts uses token authentication, with a test-only token (0600 file in
a 0700 folder) given through ``RAY_AUTH_TOKEN_PATH``; start one with
``ray_support.start_test_ray`` (the project's own local cluster: token auth, 127.0.0.1, private
temp folder) or, for several nodes, ``ray_support.local_cluster`` (``ray.cluster_utils.Cluster``
with ``ray_node_args()``, Ray's default temp folder moved to the private one: ``/tmp/ray`` need
not exist).
"""

from __future__ import annotations

import logging
import os
import secrets
from collections.abc import Iterator
from pathlib import Path

import pytest
from orthanc_server import orthanc  # noqa: F401 - the session's one Orthanc, for every module

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("PDD_SHARED", REPO_ROOT.parent / "shared"))

# Two cores on CI: keep BLAS/torch from oversubscribing when Ray workers run beside the tests.
os.environ.setdefault("OMP_NUM_THREADS", "2")

RAY_AUTH_VARS = ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")
# Ray's background threads (metrics export) may log after pytest closed a test's captured
# stream; logging would print a "--- Logging error ---" traceback for each such record. Those are
# writes to a closed capture buffer, not failures of the code under test.
logging.raiseExceptions = False


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


@pytest.fixture(scope="session", autouse=True)
def ray_test_token(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A test-only Ray token for the session: token auth on for every cluster tests start."""
    folder = tmp_path_factory.mktemp("ray-auth")
    folder.chmod(0o700)
    token = folder / "token"
    fd = os.open(token, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_hex(32))
    saved = {k: os.environ.get(k) for k in RAY_AUTH_VARS}
    os.environ.pop("RAY_AUTH_TOKEN", None)
    os.environ.update({"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token)})
    yield token
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


def _starts_its_own_ray(item: pytest.Item) -> bool:
    """A test marked ``ray`` that does not ask for ``shared_ray``: it stops the shared one."""
    return item.get_closest_marker("ray") is not None and "shared_ray" not in item.fixturenames


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Run the modules whose tests start a Ray cluster of their own first, every other module
    after them, each in its usual order (a stable sort: a module's tests stay together).

    Such a test stops the shared Ray (``_shared_ray_for_test``), and the next test that asks for
    it pays a cluster start and the first import of torch in fresh workers again; grouped
    first, the shared Ray starts once a session. Tests and what they check are unchanged."""
    own = {item.path for item in items if _starts_its_own_ray(item)}
    items.sort(key=lambda item: item.path not in own)


@pytest.fixture(scope="session")
def shared_ray(ray_test_token: Path) -> Iterator[None]:
    """The session's shared local Ray (``ray_support.use_shared_ray``: 2 CPUs, token auth,
    127.0.0.1, private temp folder), running before each test that asks for it (directly or
    through a module fixture; ``_shared_ray_for_test``) and stopped at the end of the session.

    Tests must not ``ray.shutdown()`` it; a test that needs a cluster of its own starts one
    with ``ray_support.start_test_ray`` / ``local_cluster``, which stop the shared one first."""
    from ray_support import release_shared_ray, use_shared_ray

    use_shared_ray()
    yield
    release_shared_ray()


@pytest.fixture(autouse=True)
def _shared_ray_for_test(request: pytest.FixtureRequest) -> None:
    """Before each test: the shared Ray running if the test asks for ``shared_ray``; stopped if
    the test is marked ``ray`` without asking for it (it expects to start, or join, its own)."""
    if "shared_ray" in request.fixturenames:
        from ray_support import use_shared_ray

        use_shared_ray()
    elif request.node.get_closest_marker("ray") is not None:
        from ray_support import release_shared_ray

        release_shared_ray()
