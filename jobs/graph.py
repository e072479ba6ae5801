"""The Ray Data graph of a screening run: work units sharded by a stable hash -> read tasks ->
the actor pool holding the PDD model -> PNG encoding (numpy rows, whose columns
``pdd_batch.runs.rows`` defines)."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import ray

from jobs.predictor import SlicePredictor, encode_heatmaps_fn
from jobs.read_task import read_series_fn
from jobs.resources import ActorPlan
from pdd_batch.ingest import keys
from pdd_batch.ingest.archive_io import IngestLimits
from pdd_batch.ingest.series import SeriesRef
from pdd_batch.runs.run_types import ModelInfo

# Test-only fault injection (a marker-file path each): an actor / a read worker dies once.
CRASH_ONCE_ENV = "PDD_FAULT_CRASH_ONCE"
CRASH_ONCE_READ_ENV = "PDD_FAULT_CRASH_ONCE_READ"
ROWS_PER_BLOCK = 32
MAX_INPUT_BLOCKS = 2000


def stable_shard(series_key: str, n_shards: int) -> int:
    """Shard of a series: SHA-256 of its key (stable across runs and machines)."""
    return int(hashlib.sha256(series_key.encode()).hexdigest()[:12], 16) % n_shards


def build_dataset(
    units: list[SeriesRef],
    root: Path,
    model: ModelInfo,
    plan: ActorPlan,
    precision: str = "fp32",
    teacher_weights: dict[str, str] | None = None,
    limits: IngestLimits | None = None,
) -> ray.data.Dataset:
    """The Ray Data graph: work units -> read tasks -> actor pool -> PNG encoding (numpy rows).

    ``precision`` is the actors' forward precision ("fp32" | "bf16", ``model.precision``);
    ``teacher_weights`` where the checkpoint's teacher weight files are now, by role (optional);
    ``limits`` the ingest caps the read tasks apply (default ``IngestLimits()``).

    Fault tolerance comes from Ray Data's defaults, which this graph relies on (passing them as
    ``ray_remote_args`` is deprecated in Ray 2.60): pool actors get ``max_restarts=-1`` and
    ``max_task_retries=-1`` (a killed actor is restarted and its batch retried), read tasks Ray's
    ``max_retries=3`` for worker crashes. The sink drops any row it already has, so a retried
    block can never duplicate a slice.
    """
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.execution_options.preserve_order = False
    n_blocks = max(1, min(len(units), MAX_INPUT_BLOCKS))
    ordered = sorted(units, key=lambda r: (stable_shard(r.series_key, n_blocks), r.series_key))
    items = [{"series": json.dumps(r.to_dict(), sort_keys=True)} for r in ordered]
    ds = ray.data.from_items(items, override_num_blocks=n_blocks)
    ds = ds.map_batches(
        read_series_fn,
        fn_kwargs={
            "archive_root": str(root),
            "preprocessing": model.preprocessing,
            "rows_per_block": ROWS_PER_BLOCK,
            "crash_once_marker": os.environ.get(CRASH_ONCE_READ_ENV) or None,
            "limits": json.dumps((limits or IngestLimits()).to_dict()),
            # stacks are matched by series key: workers get that sub-key, nothing more
            "series_subkey": keys.site_key().export_scoped("series"),
        },
        batch_size=1,
        batch_format="numpy",
        num_cpus=plan.read_cpus,
    )
    scored = ds.map_batches(
        SlicePredictor,
        fn_constructor_kwargs={
            "checkpoint": str(model.path.resolve()),
            "device": plan.device,
            "torch_threads": plan.torch_threads,
            "precision": precision,
            "teacher_weights": teacher_weights or None,
            "crash_once_marker": os.environ.get(CRASH_ONCE_ENV) or None,
        },
        batch_size=plan.batch_size,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=plan.num_actors),
        num_cpus=plan.num_cpus,
        num_gpus=plan.num_gpus,
        memory=plan.memory,
    )
    # PNG encoding off the model actors, on any free CPU (it capped GPU actors, see predictor)
    return scored.map_batches(encode_heatmaps_fn, batch_format="numpy", num_cpus=plan.read_cpus)
