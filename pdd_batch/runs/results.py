"""Reader of a finished (or running) screening run folder: ``open_run(run_dir) -> RunResults``.

A run folder holds the Parquet datasets ``slices/``, ``studies/``, ``errors/`` (schemas in
``pdd_batch.runs.schema``) and ``manifest.json``. Every consumer of screening output (summary, export,
report) reads it through this module, so schema details live in one place.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pdd_batch.runs.schema import TABLES

log = logging.getLogger(__name__)

# Manifest keys that may name the archive root (the first present one wins).
ARCHIVE_ROOT_KEYS = ("archive_root", "archive", "input_root", "root")


class ResultsError(ValueError):
    """A run folder that cannot be read; the message names the folder part or the column."""


def _data_files(table_dir: Path) -> list[Path]:
    """Completed Parquet files of one dataset (temp/hidden files of an atomic write are skipped)."""
    if not table_dir.is_dir():
        return []
    files = []
    for p in sorted(table_dir.rglob("*.parquet")):
        rel = p.relative_to(table_dir)
        if any(part.startswith((".", "_")) for part in rel.parts) or ".tmp" in p.name:
            continue
        files.append(p)
    return files


def _conform(table: pa.Table, schema: pa.Schema, name: str) -> pa.Table:
    """Cast to the contract schema: missing nullable columns become nulls, extras are kept."""
    columns, fields = [], []
    for f in schema:
        if f.name in table.column_names:
            col = table.column(f.name)
            try:
                col = col.cast(f.type)
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
                raise ResultsError(f"{name}: column {f.name!r} has type {col.type}: {exc}") from exc
        elif f.nullable:
            col = pa.nulls(table.num_rows, type=f.type)
        else:
            raise ResultsError(f"{name}: required column {f.name!r} is missing")
        columns.append(col)
        fields.append(f)
    for extra in table.column_names:
        if extra not in schema.names:
            columns.append(table.column(extra))
            fields.append(table.schema.field(extra))
    return pa.Table.from_arrays(columns, schema=pa.schema(fields, metadata=schema.metadata))


def read_table(run_dir: Path, name: str) -> pa.Table:
    """Read one dataset of a run folder (``slices``/``studies``/``errors``); empty when absent."""
    schema = TABLES[name]
    files = _data_files(run_dir / name)
    if not files:
        return schema.empty_table()
    parts = []
    for f in files:
        try:
            parts.append(_conform(pq.read_table(f), schema, f"{name}/{f.name}"))
        except (OSError, pa.ArrowException) as exc:
            raise ResultsError(f"{name}/{f.name}: unreadable Parquet file ({exc})") from exc
    return pa.concat_tables(parts, promote_options="permissive")


def read_manifest(run_dir: Path) -> dict[str, Any]:
    """The run manifest, or ``{}`` when the run wrote none (yet)."""
    path = run_dir / "manifest.json"
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise ResultsError(f"manifest.json: cannot read ({exc})") from exc
    if not isinstance(data, dict):
        raise ResultsError("manifest.json: expected a JSON object")
    return data


@dataclass(frozen=True)
class RunResults:
    """The outputs of one screening run.

    Attributes:
        run_dir: the run folder.
        slices: one row per scored slice (``SLICES_SCHEMA`` columns first).
        studies: one row per study (``STUDIES_SCHEMA``).
        errors: one row per unusable file or series (``ERRORS_SCHEMA``).
        manifest: the parsed ``manifest.json`` (``{}`` when absent).
    """

    run_dir: Path
    slices: pa.Table
    studies: pa.Table
    errors: pa.Table
    manifest: dict[str, Any] = field(default_factory=dict)

    @property
    def archive_root(self) -> Path | None:
        """Folder that ``slices.source_file`` is relative to, from the manifest (None if absent)."""
        for key in ARCHIVE_ROOT_KEYS:
            value = self.manifest.get(key)
            if isinstance(value, str) and value:
                return Path(value)
        return None

    @property
    def status(self) -> str:
        """Run status from the manifest (``"unknown"`` when it has none)."""
        return str(self.manifest.get("status", "unknown"))

    @property
    def model_id(self) -> str | None:
        """Model id of the run (manifest first, else the first slice row)."""
        return self._provenance("model_id")

    @property
    def checkpoint_hash(self) -> str | None:
        """Checkpoint hash of the run (manifest first, else the first slice row)."""
        return self._provenance("checkpoint_hash")

    def _provenance(self, key: str) -> str | None:
        value = self.manifest.get(key)
        if isinstance(value, str) and value:
            return value
        for table in (self.slices, self.studies):
            if table.num_rows and key in table.column_names:
                return str(table.column(key)[0].as_py())
        return None

    def ranked_studies(self) -> pa.Table:
        """All studies, highest ``max_score`` first (ties broken by ``study_key``)."""
        return self.studies.sort_by([("max_score", "descending"), ("study_key", "ascending")])

    def flagged_studies(self, top: int | None = None, min_score: float | None = None) -> pa.Table:
        """Studies selected for review, ranked by ``max_score``.

        Args:
            top: the ``top`` highest-scoring studies, whatever their decision.
            min_score: studies whose ``max_score`` is at least this, whatever their decision.

        With neither, the studies whose decision is ``"flagged"``. With both, both filters apply.
        """
        if top is not None and top < 0:
            raise ResultsError(f"top must be >= 0, got {top}")
        ranked = self.ranked_studies()
        if top is None and min_score is None:
            return ranked.filter(pc.equal(ranked.column("decision"), "flagged"))
        if min_score is not None:
            ranked = ranked.filter(pc.greater_equal(ranked.column("max_score"), float(min_score)))
        if top is not None:
            ranked = ranked.slice(0, top)
        return ranked

    def study_slices(self, study_key: str) -> pa.Table:
        """Slices of one study, highest score first."""
        rows = self.slices.filter(pc.equal(self.slices.column("study_key"), study_key))
        return rows.sort_by([("score", "descending"), ("slice_key", "ascending")])

    def top_slices(self, study_key: str, k: int = 3, flagged_only: bool = False) -> pa.Table:
        """The ``k`` highest-scoring slices of a study (only ``flagged`` ones if asked)."""
        rows = self.study_slices(study_key)
        if flagged_only:
            rows = rows.filter(rows.column("flagged"))
        return rows.slice(0, max(k, 0))

    def counts(self) -> dict[str, int]:
        """Row counts and flagged counts, for summaries."""
        decision = self.studies.column("decision")
        return {
            "studies": self.studies.num_rows,
            "flagged_studies": int(pc.sum(pc.equal(decision, "flagged")).as_py() or 0),
            "slices": self.slices.num_rows,
            "flagged_slices": int(pc.sum(self.slices.column("flagged")).as_py() or 0),
            "errors": self.errors.num_rows,
            "series": len(pc.unique(self.slices.column("series_key"))),
        }


def open_run(run_dir: str | Path) -> RunResults:
    """Read a run folder written by ``pdd-batch screen``.

    Raises:
        ResultsError: the folder does not exist, or a dataset or the manifest is unreadable.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ResultsError(f"run folder not found: {run_dir}")
    tables = {name: read_table(run_dir, name) for name in TABLES}
    if not any((run_dir / n).exists() for n in TABLES) and not (run_dir / "manifest.json").exists():
        raise ResultsError(f"{run_dir} is not a screening run folder (no slices/studies/manifest)")
    return RunResults(
        run_dir=run_dir,
        slices=tables["slices"],
        studies=tables["studies"],
        errors=tables["errors"],
        manifest=read_manifest(run_dir),
    )
