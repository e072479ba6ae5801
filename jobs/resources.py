"""How many model actors, with what CPU/GPU each, and what batch size (from the run config).

GPU clusters: one actor per GPU (``num_gpus=1`` each), large batches. CPU-only clusters: a few
CPU actors, each with its own torch threads, leaving CPUs for the read tasks that feed them.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

DEFAULT_BATCH_SIZE = {"cuda": 64, "cpu": 16}
CPU_PER_READ_TASK = 1.0
MIN_ACTOR_CPU = 0.25
# Memory reserved per model actor (scheduling only). It also keeps Ray Data from fusing the read
# tasks into the actors (operators with identical resources are fused), so decoding stays on
# separate CPU workers and the model never waits on it.
ACTOR_MEMORY = {"cuda": 4 * 1024**3, "cpu": 3 * 1024**3 // 2}


class ResourceError(ValueError):
    """Requested resources that the cluster cannot give; the message names the key."""


@dataclass(frozen=True)
class ActorPlan:
    """Resources of the scoring stage.

    Attributes:
        num_actors: model actors in the pool.
        num_cpus: CPUs reserved per actor (also its torch thread count on CPU).
        num_gpus: GPUs per actor (1 on GPU clusters, 0 otherwise).
        batch_size: slices per model call.
        device: ``"cuda"`` or ``"cpu"``.
        memory: bytes of memory reserved per actor.
        read_cpus: CPUs per read task.
    """

    num_actors: int
    num_cpus: float
    num_gpus: float
    batch_size: int
    device: str
    memory: int = ACTOR_MEMORY["cpu"]
    read_cpus: float = CPU_PER_READ_TASK

    @property
    def torch_threads(self) -> int:
        return max(1, int(self.num_cpus))


def plan_actors(
    cluster: Mapping[str, float],
    *,
    num_actors: int | None = None,
    batch_size: int | None = None,
) -> ActorPlan:
    """Plan the actor pool from ``ray.cluster_resources()``-style totals.

    Args:
        cluster: total resources, e.g. ``{"CPU": 16.0, "GPU": 2.0}``.
        num_actors: requested actor count (``--num-actors``); default one per GPU, or on CPU
            clusters about a third of the CPUs (at least one), so reading keeps up.
        batch_size: requested batch size (``--batch-size``); default by device.
    """
    cpus = float(cluster.get("CPU", 0.0))
    gpus = int(cluster.get("GPU", 0.0))
    if cpus < 1:
        raise ResourceError(f"cluster has no CPU to run read tasks (CPU={cpus})")
    if gpus > 0:
        n = num_actors or gpus
        if n > gpus:
            raise ResourceError(f"num_actors={n} exceeds the cluster's {gpus} GPUs")
        per_cpu = 1.0 if cpus >= n + 1 else 0.0
        bs = batch_size or DEFAULT_BATCH_SIZE["cuda"]
        return ActorPlan(n, per_cpu, 1.0, bs, "cuda", ACTOR_MEMORY["cuda"])
    n = num_actors or max(1, int(cpus) // 3)
    read_cpus = CPU_PER_READ_TASK if cpus >= 2 else cpus / 2
    avail = cpus - read_cpus  # never let actors hold every CPU: read tasks would starve
    per_cpu = avail / n
    if per_cpu >= 1:
        per_cpu = float(int(per_cpu))
    if per_cpu < MIN_ACTOR_CPU:
        raise ResourceError(
            f"num_actors={n} leaves under {MIN_ACTOR_CPU} CPU per actor on {cpus:g} CPUs"
        )
    bs = batch_size or DEFAULT_BATCH_SIZE["cpu"]
    return ActorPlan(n, per_cpu, 0.0, bs, "cpu", ACTOR_MEMORY["cpu"], read_cpus)
