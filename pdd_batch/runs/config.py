"""Run configuration of a screening run (frozen, validated at the edge; errors name the key).

Model configuration lives with the model (``model.config``); this is only how a run is executed
and written.
"""

from __future__ import annotations

import os
import uuid
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from pdd_batch.ingest.archive_io import IngestLimits
from pdd_batch.runs.outcome import DEFAULT_MIN_ASSESSED, check_min_assessed

PRECISIONS = ("fp32", "bf16")
# Discovery on a cluster (``jobs.discovery_shards``): headers read in Ray tasks when at least
# this many are to be read, in shards of at most this many files (docs/architecture.md).
DISCOVERY_SHARD_MIN_FILES = 2000
DISCOVERY_SHARD_FILES = 256
TEACHER_ROLES = ("cnn", "mamba")


class RunConfigError(ValueError):
    """A run option that cannot be used; the message names the key."""


def new_run_id() -> str:
    """A run id: UTC timestamp plus a short random suffix (no patient data)."""
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    return f"{stamp}-{uuid.uuid4().hex[:6]}"


@dataclass(frozen=True)
class RunConfig:
    """How one ``pdd-batch screen`` run is executed.

    Attributes:
        archive: folder (or archive file) to screen.
        out_dir: run folder receiving ``slices/``, ``studies/``, ``errors/``, ``manifest.json``.
        model_path: checkpoint folder; ``None`` means the embedded default set (head CT and
            chest X-ray, ``model.default.default_model_paths``).
        more_models: further checkpoint (or model-set) folders: each series goes to the model
            whose scope matches it (``pdd_batch.ingest.scope``).
        address: Ray cluster to join; ``None`` falls back to ``RAY_ADDRESS`` then a local cluster.
        force: rescreen every series, replacing earlier results.
        batch_size: slices per model call; ``None`` picks from the device (see jobs.resources).
        num_actors: model actors; ``None`` picks from the cluster's CPUs/GPUs.
        num_cpus: CPUs of a local cluster (``None``: all of this machine's).
        rows_per_file: slices buffered before a Parquet part is committed (sane file counts).
        flush_seconds: commit buffered complete series at least this often (bounds crash loss).
        topk: k of the study ``topk_mean``.
        min_assessed: share of a study's slices that must be assessed (within the model's
            in-distribution check) for the study to be ``normal`` (``runs.outcome``); recorded
            in the manifest's ``run_config``.
        open_archives: also look inside .zip/.tar files during discovery.
        run_id: identifier written on every row.
        precision: model arithmetic, ``"fp32"`` (default) or ``"bf16"`` (autocast; for GPUs,
            where it is faster; anomaly maps and scores are still computed in float32).
        teacher_weights: new locations of a checkpoint's file-sourced teacher weights by role
            (``{"cnn": PATH}``) when they are not where the checkpoint was trained; each file's
            sha256 is still checked against the checkpoint's record.
        follow_links_outside: read links under the archive that resolve outside it (refused,
            with an error row, by default).
        discovery_shard_min_files, discovery_shard_files: on a cluster of more than one node,
            discovery reads headers in Ray tasks when at least ``discovery_shard_min_files``
            are to be read, in shards of at most ``discovery_shard_files`` files by folder.
        max_series_voxels, max_frames_per_file, max_member_bytes, max_compression_ratio: the
            caps of ``IngestLimits`` (``limits``): an input over one is a failed error row and
            is never allocated.
    """

    archive: Path
    out_dir: Path
    model_path: Path | None = None
    address: str | None = None
    force: bool = False
    batch_size: int | None = None
    num_actors: int | None = None
    num_cpus: int | None = None
    rows_per_file: int = 4096
    flush_seconds: float = 30.0
    topk: int = 5
    min_assessed: float = DEFAULT_MIN_ASSESSED
    open_archives: bool = False
    run_id: str = field(default_factory=new_run_id)
    precision: str = "fp32"
    teacher_weights: dict[str, str] = field(default_factory=dict)
    follow_links_outside: bool = False
    max_series_voxels: int = IngestLimits.max_series_voxels
    max_frames_per_file: int = IngestLimits.max_frames_per_file
    max_member_bytes: int = IngestLimits.max_member_bytes
    max_compression_ratio: float = IngestLimits.max_compression_ratio
    more_models: tuple[Path, ...] = ()
    discovery_shard_min_files: int = DISCOVERY_SHARD_MIN_FILES
    discovery_shard_files: int = DISCOVERY_SHARD_FILES

    def __post_init__(self) -> None:
        object.__setattr__(self, "archive", Path(self.archive))
        object.__setattr__(self, "out_dir", Path(self.out_dir))
        if self.model_path is not None:
            object.__setattr__(self, "model_path", Path(self.model_path))
        object.__setattr__(self, "more_models", tuple(Path(p) for p in self.more_models))
        for key in ("batch_size", "num_actors", "num_cpus", "discovery_shard_files"):
            value = getattr(self, key)
            if value is not None and int(value) < 1:
                raise RunConfigError(f"{key} must be >= 1, got {value}")
        if self.discovery_shard_min_files < 0:
            raise RunConfigError(
                f"discovery_shard_min_files must be >= 0, got {self.discovery_shard_min_files}"
            )
        if self.rows_per_file < 1:
            raise RunConfigError(f"rows_per_file must be >= 1, got {self.rows_per_file}")
        if self.flush_seconds <= 0:
            raise RunConfigError(f"flush_seconds must be > 0, got {self.flush_seconds}")
        if self.topk < 1:
            raise RunConfigError(f"topk must be >= 1, got {self.topk}")
        try:
            check_min_assessed(self.min_assessed)
        except ValueError as exc:
            raise RunConfigError(str(exc)) from None
        for key in IngestLimits.__dataclass_fields__:
            if not getattr(self, key) > 0:
                raise RunConfigError(f"{key} must be > 0, got {getattr(self, key)}")
        if self.precision not in PRECISIONS:
            raise RunConfigError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        # roles known, paths absolute (actors may run in another working directory)
        object.__setattr__(self, "teacher_weights", resolve_teacher_weights(self.teacher_weights))
        if not self.run_id or "/" in self.run_id:
            raise RunConfigError(f"run_id must be a name without '/', got {self.run_id!r}")

    @property
    def limits(self) -> IngestLimits:
        """The ingest caps of this run (discovery on the driver, read tasks on workers)."""
        return IngestLimits(
            max_series_voxels=self.max_series_voxels,
            max_frames_per_file=self.max_frames_per_file,
            max_member_bytes=self.max_member_bytes,
            max_compression_ratio=self.max_compression_ratio,
        )

    @property
    def resolved_address(self) -> str | None:
        """``address``, else ``RAY_ADDRESS`` from the environment, else ``None`` (local cluster)."""
        return self.address or os.environ.get("RAY_ADDRESS") or None

    def with_updates(self, **changes: Any) -> RunConfig:
        """A copy with some fields changed (validated again)."""
        return replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (paths as strings)."""
        d = asdict(self)
        for key in ("archive", "out_dir", "model_path"):
            d[key] = None if d[key] is None else str(d[key])
        d["more_models"] = [str(p) for p in self.more_models]
        return d


def resolve_teacher_weights(weights: dict[str, str] | None) -> dict[str, str]:
    """``{role: path}`` checked (roles in ``TEACHER_ROLES``, non-empty paths), paths absolute.

    Raises:
        RunConfigError: an unknown role or an empty path.
    """
    out: dict[str, str] = {}
    for role, path in (weights or {}).items():
        if role not in TEACHER_ROLES or not str(path):
            raise RunConfigError(
                f"teacher_weights (--teacher-weights ROLE=PATH) wants ROLE in {TEACHER_ROLES} "
                f"and a path, got {role!r}: {path!r}"
            )
        out[role] = str(Path(path).expanduser().resolve())
    return out


def parse_teacher_weights(pairs: list[str] | tuple[str, ...]) -> dict[str, str]:
    """``["cnn=PATH", "mamba=PATH"]`` (the ``--teacher-weights`` options) → ``{role: PATH}``.

    Raises:
        RunConfigError: a pair that is not ``ROLE=PATH`` with ROLE in ``TEACHER_ROLES``.
    """
    weights: dict[str, str] = {}
    for pair in pairs:
        role, sep, path = pair.partition("=")
        if not sep:
            raise RunConfigError(f"--teacher-weights wants ROLE=PATH, got {pair!r}")
        weights[role] = path
    return resolve_teacher_weights(weights)
