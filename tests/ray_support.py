"""Starting Ray in tests the way the project does: token auth (the session's test token, see
conftest), node address 127.0.0.1, private temp folder, no dashboard."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

import ray
from ray.cluster_utils import Cluster

from jobs.cluster import (
    LOCAL_HOST,
    ray_temp_dir,
    start_local,
    use_loopback_only,
    use_token_auth,
)

# Ray's default temp folder is ``$RAY_TMPDIR/ray`` (else ``$TMPDIR/ray``, else ``/tmp/ray``).
RAY_TMPDIR_ENV = "RAY_TMPDIR"


# The session's shared local cluster (``use_shared_ray``): whether it is the Ray running now.
_shared = {"running": False}
SHARED_CPUS = 2


def use_shared_ray() -> None:
    """Make the session's shared local Ray the one this process is connected to.

    It is ``start_test_ray(num_cpus=2)``, started on first use and kept between the tests that
    ask for it (fixture ``shared_ray`` of conftest), so that they do not each pay a cluster start
    and the first import of torch in its workers. Tests that need a cluster of their own (other
    CPUs, another temp folder, several nodes) call ``start_test_ray`` or ``local_cluster``, which
    stop the shared one first; the next test that asks for it starts it again.
    """
    if _shared["running"] and ray.is_initialized():
        return
    if ray.is_initialized():  # a cluster some test left running: never join it by accident
        ray.shutdown()
    start_local(SHARED_CPUS)
    _shared["running"] = True


def release_shared_ray() -> None:
    """Stop the shared local Ray if it is the one running (a no-op otherwise)."""
    if _shared["running"] and ray.is_initialized():
        ray.shutdown()
    _shared["running"] = False


def start_test_ray(num_cpus: int = 2, **kwargs: object) -> None:
    """Start a local Ray cluster of the test's own (``jobs.cluster.start_local``); the shared
    one (``use_shared_ray``) is stopped first."""
    release_shared_ray()
    start_local(num_cpus, **kwargs)


def ray_node_args(num_cpus: int = 1) -> dict[str, object]:
    """``ray.cluster_utils.Cluster`` node arguments; token auth and loopback-only set first."""
    use_token_auth()
    use_loopback_only()
    return {
        "num_cpus": num_cpus,
        "node_ip_address": LOCAL_HOST,
        "temp_dir": str(ray_temp_dir()),
        "include_dashboard": False,
    }


@contextmanager
def private_default_temp() -> Iterator[None]:
    """Point Ray's *default* temp folder at the project's private one while the block runs.

    ``ray.cluster_utils.Cluster`` writes (and on shutdown removes) ``ray_current_cluster`` in
    Ray's default temp folder whatever ``temp_dir`` its nodes use; that folder (``/tmp/ray``)
    does not exist on a machine where Ray never ran, and must not be created there.
    ``RAY_TMPDIR=<tmp>/pdd-batch-<uid>`` makes the default ``ray_temp_dir()`` itself.
    """
    previous = os.environ.get(RAY_TMPDIR_ENV)
    os.environ[RAY_TMPDIR_ENV] = str(ray_temp_dir().parent)
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(RAY_TMPDIR_ENV, None)
        else:
            os.environ[RAY_TMPDIR_ENV] = previous


@contextmanager
def local_cluster(nodes: int = 2, cpus_per_node: int = 1) -> Iterator[Cluster]:
    """A Ray cluster of ``nodes`` nodes on this machine (``ray.cluster_utils.Cluster``) with the
    project's node arguments and its address file in the private temp folder (the shared local
    Ray, if running, is stopped first)."""
    release_shared_ray()
    with private_default_temp():
        cluster = Cluster(initialize_head=True, head_node_args=ray_node_args(cpus_per_node))
        try:
            for _ in range(nodes - 1):
                cluster.add_node(**ray_node_args(cpus_per_node))
            cluster.wait_for_nodes()
            yield cluster
        finally:
            cluster.shutdown()
