"""Actor pool planning: GPUs get one actor each, CPU pools never starve the read tasks."""

from __future__ import annotations

import pytest

from jobs.resources import DEFAULT_BATCH_SIZE, ResourceError, plan_actors


def test_gpu_cluster_gets_one_actor_per_gpu_with_large_batches() -> None:
    plan = plan_actors({"CPU": 16.0, "GPU": 2.0})
    assert (plan.num_actors, plan.num_gpus, plan.device) == (2, 1.0, "cuda")
    assert plan.batch_size == DEFAULT_BATCH_SIZE["cuda"]
    assert plan_actors({"CPU": 16.0, "GPU": 2.0}, batch_size=7).batch_size == 7
    with pytest.raises(ResourceError, match="num_actors"):
        plan_actors({"CPU": 16.0, "GPU": 2.0}, num_actors=3)


@pytest.mark.parametrize("cpus", [1.0, 2.0, 3.0, 8.0, 64.0])
@pytest.mark.parametrize("actors", [None, 1, 2])
def test_cpu_actors_always_leave_room_for_a_read_task(cpus: float, actors: int | None) -> None:
    if actors and cpus / actors < 0.5:
        pytest.skip("more actors than CPUs")
    plan = plan_actors({"CPU": cpus}, num_actors=actors)
    assert plan.num_gpus == 0 and plan.device == "cpu"
    assert plan.num_actors * plan.num_cpus + plan.read_cpus <= cpus + 1e-9
    assert plan.torch_threads >= 1 and plan.batch_size == DEFAULT_BATCH_SIZE["cpu"]


def test_impossible_plans_name_the_key() -> None:
    with pytest.raises(ResourceError, match="CPU"):
        plan_actors({"CPU": 0.0})
    with pytest.raises(ResourceError, match="num_actors=8"):
        plan_actors({"CPU": 2.0}, num_actors=8)


def test_model_pools_share_gpus_and_cpus_by_the_stated_rule() -> None:
    from jobs.resources import plan_model_pools

    two = plan_model_pools({"CPU": 16.0, "GPU": 4.0}, 2)
    assert [(p.num_actors, p.num_gpus) for p in two] == [(2, 1.0), (2, 1.0)]
    shared = plan_model_pools({"CPU": 8.0, "GPU": 1.0}, 2)
    assert [(p.num_actors, p.num_gpus) for p in shared] == [(1, 0.5), (1, 0.5)]
    cpu = plan_model_pools({"CPU": 2.0}, 2)
    assert [(p.num_actors, p.num_cpus, p.read_cpus) for p in cpu] == [(1, 0.5, 0.5)] * 2
    assert plan_model_pools({"CPU": 4.0}, 1)[0] == plan_actors({"CPU": 4.0})
    with pytest.raises(ResourceError):
        plan_model_pools({"CPU": 2.0}, 2, num_actors=4)
