"""Starting Ray in tests the way the project does: token auth (the session's test token, see
conftest), node address 127.0.0.1, private temp folder, no dashboard."""

from __future__ import annotations

from jobs.cluster import (
    LOCAL_HOST,
    ray_temp_dir,
    start_local,
    use_loopback_only,
    use_token_auth,
)


def start_test_ray(num_cpus: int = 2, **kwargs: object) -> None:
    """Start the project's local Ray cluster (``jobs.cluster.start_local``) for a test."""
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
