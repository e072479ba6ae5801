"""The types of a screening run (a leaf module: it imports no run lifecycle): progress events,
the result of a run, a resolved model, and the context one run carries from preparation to its
final manifest (``RunContext``). ``jobs.screen`` builds the Ray graph around them;
``pdd_batch.runs.lifecycle`` is the run's bookkeeping."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pdd_batch.evaluation.site_calibration import SOURCE_NONE
from pdd_batch.ingest.scope import UNKNOWN_SCOPE, ModelScope, Routed
from pdd_batch.runs.config import RunConfig

if TYPE_CHECKING:
    from pdd_batch.ingest.series import Discovery, SeriesRef
    from pdd_batch.runs.sink import SliceSink
    from pdd_batch.runs.state import RunState


@dataclass(frozen=True)
class ProgressEvent:
    """One progress update: ``stage`` is discover | series | slices | commit | finalise, or
    warning (``note``: a message for the user, e.g. what this run will replace)."""

    stage: str
    done: int
    total: int | None = None
    rate: float | None = None  # per second, for "slices"
    note: str = ""


ProgressFn = Callable[[ProgressEvent], None]


@dataclass(frozen=True)
class ScreenResult:
    """Outcome of ``run_screen``: the manifest written, the process exit code and the warnings
    given (also sent as ``warning`` progress events)."""

    out_dir: Path
    status: str
    exit_code: int
    manifest: dict[str, Any]
    warnings: tuple[str, ...] = ()


@dataclass(frozen=True)
class ModelInfo:
    path: Path
    model_id: str
    checkpoint_hash: str
    preprocessing: str  # JSON
    threshold: float | None
    scope: ModelScope = UNKNOWN_SCOPE
    ood_threshold: float | None = None  # the in-distribution check's, when it has one
    ood_sha256: str | None = None
    threshold_source: str = SOURCE_NONE  # "site", "development set" or "uncalibrated"


@dataclass
class RunContext:
    """What one run carries from preparation to the final manifest."""

    cfg: RunConfig
    state: RunState
    model: ModelInfo
    disc: Discovery
    pending: list[SeriesRef]
    sink: SliceSink
    progress: ProgressFn | None
    t_start: float
    timings: dict[str, float] = field(default_factory=dict)
    cluster: Any = None  # jobs.cluster.ClusterInfo once connected
    key_id: str = ""
    warnings: tuple[str, ...] = ()
    # the manifest as the run stands (the "running" one), and, when this run replaces earlier
    # results, the manifest that describes them (kept until this run publishes)
    manifest: dict[str, Any] = field(default_factory=dict)
    published_manifest: dict[str, Any] | None = None
    models: list[ModelInfo] = field(default_factory=list)  # a routed set: each with its series
    routed: Routed | None = None
    discovery: dict[str, int] = field(default_factory=dict)  # header_reads, files_unchanged, shards
    source_failed: int = 0  # series a source stage could not fetch: the run is incomplete
    source_summary: dict[str, Any] | None = None  # a PACS source: cursor and fetch counts
