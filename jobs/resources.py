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


def plan_model_pools(
    cluster: Mapping[str, float],
    n_models: int,
    *,
    num_actors: int | None = None,
    batch_size: int | None = None,
) -> list[ActorPlan]:
    """One actor pool per model of a routed model set, sharing the cluster.

    The rule: on GPU clusters the GPUs are split evenly, each model's pool getting
    ``max(1, G // M)`` actors; when there are fewer GPUs than models (G < M), each actor takes
    ``G / M`` of a GPU, so the models share the devices (Ray's fractional GPUs). On CPU clusters
    the model actors of ``plan_actors`` (at least one per model) share the CPUs left after one
    read task, evenly (read tasks then take at most an actor's share). ``num_actors`` is per
    model.

    Raises:
        ResourceError: fewer than ``MIN_ACTOR_CPU`` per actor, or more actors than GPUs.
    """
    if n_models <= 1:
        return [plan_actors(cluster, num_actors=num_actors, batch_size=batch_size)]
    cpus = float(cluster.get("CPU", 0.0))
    gpus = int(cluster.get("GPU", 0.0))
    if gpus > 0:
        share = max(1, gpus // n_models) if num_actors is None else num_actors
        per_gpu = 1.0 if gpus >= n_models else gpus / n_models
        if share * n_models * per_gpu > gpus + 1e-9:
            raise ResourceError(f"{share} actors per model x {n_models} models exceed {gpus} GPUs")
        per_cpu = 1.0 if cpus >= share * n_models + 1 else 0.0
        bs = batch_size or DEFAULT_BATCH_SIZE["cuda"]
        plan = ActorPlan(share, per_cpu, per_gpu, bs, "cuda", ACTOR_MEMORY["cuda"] // n_models)
        return [plan] * n_models
    base = plan_actors(cluster, num_actors=None, batch_size=batch_size)
    per_model = num_actors or max(1, base.num_actors // n_models)
    avail = cpus - base.read_cpus
    per_cpu = avail / (per_model * n_models)
    if per_cpu >= 1:
        per_cpu = float(int(per_cpu))
    if per_cpu < MIN_ACTOR_CPU:
        raise ResourceError(
            f"{per_model} actors for each of {n_models} models leave under {MIN_ACTOR_CPU} CPU "
            f"per actor on {cpus:g} CPUs"
        )
    # Fractional actors may land on different nodes, leaving no node a whole free CPU: read
    # tasks then ask for no more than an actor's share, so they can always be scheduled.
    read_cpus = min(base.read_cpus, per_cpu)
    plan = ActorPlan(per_model, per_cpu, 0.0, base.batch_size, "cpu", base.memory, read_cpus)
    return [plan] * n_models
