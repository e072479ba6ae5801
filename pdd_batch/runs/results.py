"""Reader of a finished (or running) screening run folder: ``open_run(run_dir) -> RunResults``.

A run folder holds the append-only Parquet datasets ``slices/``, ``heatmaps/``, ``studies/``,
``errors/`` (schemas in ``pdd_batch.runs.schema``), ``live_files.json`` (the files of each table
whose rows are current; a reader reads exactly those) and ``manifest.json``; a run's
unpublished parts (``_state/``) are never read. Folders of earlier versions (one merged file
``<name>/<name>.parquet`` per table, no list) are read as they are. Every consumer of
screening output (summary, export, report, ``pdd-batch results``) reads it through this
module, so schema details live in one place.

Runs of schema 1.0 named files by their archive-relative path (``slices.source_file``,
``errors.file``); they are read with those columns renamed to ``file_key`` (holding the path) and
``RunResults.legacy_paths`` set, so every reader works on both versions. Studies written before
2.1 (no study outcome) are read with their outcome recomputed from the run's slices
(``outcome.upgrade_studies``, under the run's recorded ``min_assessed``), so an older run never
shows a study ``normal`` that was not assessed.
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

from pdd_batch.runs.outcome import (
    DEFAULT_MIN_ASSESSED,
    FLAGGED,
    NORMAL,
    NOT_ASSESSED,
    REVIEW_QUEUE,
    review_order,
    upgrade_studies,
)
from pdd_batch.runs.schema import (
    HEATMAPS_SCHEMA,
    LEGACY_RENAMES,
    LEGACY_VERSION,
    SLICES_FILE_SCHEMA,
    SLICES_SCHEMA,
    TABLES,
)

log = logging.getLogger(__name__)

LIVE_FILE = "live_files.json"  # written by pdd_batch.runs.live, one atomic rename per change

# Manifest keys that may name the archive root (the first present one wins).
ARCHIVE_ROOT_KEYS = ("archive_root", "archive", "input_root", "root")


class ResultsError(ValueError):
    """A run folder that cannot be read; the message names the folder part or the column."""


def live_files(run_dir: Path, name: str) -> list[Path] | None:
    """The live Parquet files of table ``name`` (``slices``, ``heatmaps``, ``studies``,
    ``errors``) as ``live_files.json`` lists them; None for a folder of an earlier version
    (which has no such list)."""
    path = Path(run_dir) / LIVE_FILE
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        listed = data["tables"].get(name, [])
    except (OSError, ValueError, KeyError, AttributeError) as exc:
        raise ResultsError(f"{LIVE_FILE}: cannot read ({exc})") from exc
    files = []
    for rel in listed:
        p = Path(run_dir) / rel
        if not isinstance(rel, str) or p.parent.name != name or "/" in rel[len(name) + 1 :]:
            raise ResultsError(f"{LIVE_FILE}: not a file of {name}/")
        files.append(p)
    return files


def _data_files(table_dir: Path) -> list[Path]:
    """The Parquet files of one dataset: the live files ``live_files.json`` lists; in a folder
    of an earlier version its merged file ``<name>.parquet`` when there is one, else every
    completed file (temp/hidden files of an atomic write and ``_`` folders skipped)."""
    listed = live_files(table_dir.parent, table_dir.name)
    if listed is not None:
        return listed
    if not table_dir.is_dir():
        return []
    merged = table_dir / f"{table_dir.name}.parquet"
    if merged.is_file():
        return [merged]
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


def _is_legacy(table: pa.Table, name: str) -> bool:
    """A 1.0 file: its metadata says so, or it has the 1.0 path column and no ``file_key``."""
    meta = table.schema.metadata or {}
    if meta.get(b"pdd_batch_schema") == LEGACY_VERSION.encode():
        return True
    renames = LEGACY_RENAMES.get(name, {})
    return (
        any(old in table.column_names for old in renames) and "file_key" not in table.column_names
    )


def _upgrade(table: pa.Table, name: str) -> pa.Table:
    """A 1.0 table with its path column renamed to ``file_key`` (the key of a 1.0 run is the
    relative path itself)."""
    renames = LEGACY_RENAMES.get(name, {})
    return table.rename_columns([renames.get(c, c) for c in table.column_names])


def _read_tables(
    run_dir: Path, name: str, columns: list[str] | None = None
) -> tuple[pa.Table, bool, bool]:
    """One dataset, conformed to the current schema, whether it was written by a 1.0 run, and
    whether (studies) it predates the study outcome (2.1: no ``n_assessed`` column).
    ``columns``: read only these (of those a file has); slices never include ``heatmap_png``
    unless asked."""
    schema = TABLES[name] if name in TABLES else HEATMAPS_SCHEMA
    files = _data_files(run_dir / name)
    if columns is not None:
        schema = pa.schema([f for f in schema if f.name in columns], metadata=schema.metadata)
    elif name == "slices":
        schema = SLICES_FILE_SCHEMA
    if not files:
        return schema.empty_table(), False, False
    parts, legacy, before_outcome = [], False, False
    for f in files:
        try:
            present = pq.read_schema(f).names
            if columns is None:  # every column (extras kept), slices without their heatmaps
                wanted = [c for c in present if name != "slices" or c != "heatmap_png"]
            else:
                wanted = [c for c in present if c in schema.names or c in _old_names(name, schema)]
            table = pq.read_table(f, columns=wanted)
            if _is_legacy(table, name):
                table, legacy = _upgrade(table, name), True
            before_outcome |= name == "studies" and "n_assessed" not in table.column_names
            parts.append(_conform(table, schema, f"{name}/{f.name}"))
        except (OSError, pa.ArrowException) as exc:
            raise ResultsError(f"{name}/{f.name}: unreadable Parquet file ({exc})") from exc
    return pa.concat_tables(parts, promote_options="permissive"), legacy, before_outcome


def _old_names(name: str, schema: pa.Schema) -> set[str]:
    """1.0 names of ``schema``'s columns (read, then renamed by ``_upgrade``)."""
    return {old for old, new in LEGACY_RENAMES.get(name, {}).items() if new in schema.names}


def read_table(run_dir: Path, name: str, columns: list[str] | None = None) -> pa.Table:
    """Read the live rows of one dataset of a run folder (``slices``/``heatmaps``/``studies``/
    ``errors``); empty when absent. ``slices`` comes without its heatmaps (``heatmap_png``:
    the ``heatmaps`` table, or ``open_run``). 1.0 files are read with their path columns as
    ``file_key`` (see the module docstring)."""
    return _read_tables(Path(run_dir), name, columns)[0]


def _with_heatmaps(run_dir: Path, slices: pa.Table) -> pa.Table:
    """``slices`` with ``heatmap_png`` from the heatmaps table (a folder of an earlier version
    has them in its slices files)."""
    if live_files(run_dir, "heatmaps") is None:
        return _read_tables(run_dir, "slices", columns=SLICES_SCHEMA.names)[0]
    heat = read_table(run_dir, "heatmaps", columns=["slice_key", "heatmap_png"])
    i = slices.schema.get_field_index("heatmap_max")
    if heat.num_rows == 0:
        png = pa.nulls(slices.num_rows, pa.binary())
    else:
        idx = pc.index_in(slices["slice_key"], value_set=heat["slice_key"])
        png = pc.take(heat["heatmap_png"], idx)
    return slices.add_column(i, SLICES_SCHEMA.field("heatmap_png"), png)


def recorded_min_assessed(manifest: dict[str, Any]) -> float:
    """The run's ``min_assessed`` (its recorded run config), else the default."""
    value = (manifest.get("run_config") or {}).get("min_assessed")
    if isinstance(value, int | float) and not isinstance(value, bool) and 0 < value <= 1:
        return float(value)
    return DEFAULT_MIN_ASSESSED


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
        legacy_paths: a schema 1.0 run, whose ``file_key`` columns hold relative paths.
    """

    run_dir: Path
    slices: pa.Table
    studies: pa.Table
    errors: pa.Table
    manifest: dict[str, Any] = field(default_factory=dict)
    legacy_paths: bool = False

    @property
    def key_id(self) -> str | None:
        """Id of the site key the run's keys were made with (None: a 1.0 run)."""
        value = self.manifest.get("key_id")
        return value if isinstance(value, str) and value else None

    @property
    def archive_root(self) -> Path | None:
        """Archive folder recorded by a 1.0 run (None for later runs, which record no path)."""
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

    def review_queue(self) -> pa.Table:
        """The studies a reader should see: ``flagged`` ones, then ``not_assessed`` ones (each
        by ``max_score``, ties by ``study_key``); ``normal`` studies are not in it."""
        ranked = self.ranked_studies()
        queue = ranked.filter(pc.is_in(ranked.column("decision"), pa.array(REVIEW_QUEUE)))
        order = review_order(queue.column("decision").to_pylist())
        ranks = sorted(range(queue.num_rows), key=lambda i: (order[i], i))
        return queue.take(pa.array(ranks, type=pa.int64()))  # typed: an empty queue too

    def flagged_studies(self, top: int | None = None, min_score: float | None = None) -> pa.Table:
        """Studies selected for review or export.

        Args:
            top: the first ``top`` studies of the review queue (``review_queue``: flagged, then
                not assessed; never a normal study).
            min_score: studies whose ``max_score`` is at least this, whatever their outcome,
                ranked by ``max_score``.

        With neither, the ``flagged`` studies by ``max_score``. With both, the review queue's
        studies with ``max_score >= min_score``, the first ``top`` of them.
        """
        if top is not None and top < 0:
            raise ResultsError(f"top must be >= 0, got {top}")
        ranked = self.ranked_studies()
        if top is None and min_score is None:
            return ranked.filter(pc.equal(ranked.column("decision"), FLAGGED))
        if top is not None:
            ranked = self.review_queue()
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

    def study_outcomes(self) -> dict[str, int]:
        """Studies (one row per study and model) per outcome, every outcome present."""
        decisions = self.studies.column("decision").to_pylist()
        return {d: decisions.count(d) for d in (FLAGGED, NOT_ASSESSED, NORMAL)}

    def counts(self) -> dict[str, int]:
        """Row counts and outcome counts, for summaries (``studies``: distinct study keys;
        the outcome counts are per study and model)."""
        outcomes = self.study_outcomes()
        ood = (
            self.slices.column("out_of_distribution")
            if "out_of_distribution" in self.slices.column_names
            else pa.nulls(0, pa.bool_())
        )
        return {
            "studies": len(pc.unique(self.studies.column("study_key"))),
            "flagged_studies": outcomes[FLAGGED],
            "not_assessed_studies": outcomes[NOT_ASSESSED],
            "normal_studies": outcomes[NORMAL],
            "ood_slices": int(pc.sum(pc.fill_null(ood, False)).as_py() or 0),
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
    read = {name: _read_tables(run_dir, name) for name in TABLES}
    tables = {name: table for name, (table, _, _) in read.items()}
    tables["slices"] = _with_heatmaps(run_dir, tables["slices"])
    if not any((run_dir / n).exists() for n in TABLES) and not (run_dir / "manifest.json").exists():
        raise ResultsError(f"{run_dir} is not a screening run folder (no slices/studies/manifest)")
    manifest = read_manifest(run_dir)
    studies = tables["studies"]
    if read["studies"][2]:  # written before the study outcome: recomputed from the slices
        studies = upgrade_studies(studies, tables["slices"], recorded_min_assessed(manifest))
    return RunResults(
        run_dir=run_dir,
        slices=tables["slices"],
        studies=studies,
        errors=tables["errors"],
        manifest=manifest,
        legacy_paths=any(legacy for _, legacy, _ in read.values()),
    )
