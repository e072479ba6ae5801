"""Connecting to Ray: join a cluster (``--address`` / ``RAY_ADDRESS``) or start a local one.

A local cluster binds to 127.0.0.1 and starts no dashboard. Ray >= 2.60 turns token
authentication on by default for new local clusters; whatever ``RAY_AUTH_MODE`` the caller set is
respected (scripts that run ``ray start`` and ``ray job submit`` must set the same value).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import ray

log = logging.getLogger(__name__)

LOCAL_HOST = "127.0.0.1"


@dataclass(frozen=True)
class ClusterInfo:
    """What the run got: how it connected and the cluster's total resources."""

    mode: str  # "local" (started here), "joined" (--address/RAY_ADDRESS), "existing" (already up)
    address: str | None
    resources: dict[str, float]
    nodes: int


def _info(mode: str, address: str | None) -> ClusterInfo:
    res = {k: float(v) for k, v in ray.cluster_resources().items() if k in ("CPU", "GPU")}
    nodes = sum(1 for n in ray.nodes() if n.get("Alive"))
    return ClusterInfo(mode=mode, address=address, resources=res, nodes=nodes)


@contextmanager
def connect(address: str | None = None, *, num_cpus: int | None = None) -> Iterator[ClusterInfo]:
    """Yield a connected Ray; shut it down afterwards only if this call started or joined it.

    Args:
        address: cluster to join (``ray://`` or ``host:port`` or ``auto``); ``None`` also reads
            ``RAY_ADDRESS``, and without either starts a local cluster on 127.0.0.1.
        num_cpus: CPUs of a local cluster (ignored when joining).
    """
    if ray.is_initialized():
        yield _info("existing", address)
        return
    address = address or os.environ.get("RAY_ADDRESS") or None
    if address:
        ray.init(address=address, log_to_driver=True)
        mode = "joined"
    else:
        ray.init(
            address="local",  # a new cluster: never the one another `ray start` left running
            num_cpus=num_cpus,
            include_dashboard=False,
            _node_ip_address=LOCAL_HOST,
            log_to_driver=True,
        )
        mode = "local"
    try:
        info = _info(mode, address)
        log.info("ray %s cluster: %d node(s), %s", mode, info.nodes, info.resources)
        yield info
    finally:
        ray.shutdown()
