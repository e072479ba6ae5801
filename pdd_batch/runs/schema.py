"""The versioned Parquet schema of a screening run (one module, the contract for every reader).

Layout of a run folder ``OUT/``::

    OUT/slices/*.parquet    one row per scored slice (SLICES_FILE_SCHEMA: SLICES_SCHEMA
                            without its heatmap)
    OUT/heatmaps/*.parquet  the heatmap PNG of each slice, by slice_key (HEATMAPS_SCHEMA)
    OUT/studies/*.parquet   one row per study (STUDIES_SCHEMA)
    OUT/errors/*.parquet    one row per file or series that could not be used (ERRORS_SCHEMA)
    OUT/manifest.json       run manifest (inputs seen/scored/skipped/failed, versions, timings)
    OUT/live_files.json     the live files of each table (a run adds files and never rewrites
                            one; superseded files are left out of this list, then deleted)

Keys never contain patient identifiers: ``study_key``/``series_key``/``file_key`` are truncated
HMAC-SHA256 digests, under the site secret (``pdd_batch.keys``), of the DICOM UIDs or of the
archive-relative path. No column holds a path or a UID; ``pdd-batch screen --crosswalk FILE``
writes the key -> path/UID table to a private file outside the run folder.

Version 2.0 renamed ``slices.source_file`` and ``errors.file`` (relative paths in 1.0) to
``file_key``; ``LEGACY_TABLES`` keeps the 1.0 schemas for readers of older runs.
"""

from __future__ import annotations

import pyarrow as pa

SCHEMA_VERSION = "2.0"
LEGACY_VERSION = "1.0"

SLICES_SCHEMA = pa.schema(
    [
        pa.field("schema_version", pa.string(), nullable=False),
        pa.field("slice_key", pa.string(), nullable=False),  # unique: series_key:volume:slice
        pa.field("study_key", pa.string(), nullable=False),
        pa.field("series_key", pa.string(), nullable=False),
        pa.field("volume_index", pa.int32(), nullable=False),
        pa.field("slice_index", pa.int32(), nullable=False),
        pa.field("file_key", pa.string(), nullable=False),  # keyed digest of the relative path
        pa.field("modality", pa.string()),
        pa.field("score", pa.float32(), nullable=False),
        pa.field("threshold", pa.float32()),  # null when the model is not calibrated
        pa.field("flagged", pa.bool_(), nullable=False),
        pa.field("heatmap_png", pa.binary()),  # 8-bit PNG of the anomaly map, scaled by heatmap_max
        pa.field("heatmap_max", pa.float32()),
        pa.field("model_id", pa.string(), nullable=False),
        pa.field("checkpoint_hash", pa.string(), nullable=False),
        pa.field("preprocessing", pa.string(), nullable=False),  # PreprocessSpec JSON
        pa.field("run_id", pa.string(), nullable=False),
        pa.field("code_version", pa.string(), nullable=False),
        # distance to the model's training slices and whether it is beyond the model's
        # in-distribution threshold (then never flagged); null when the model has no check
        pa.field("ood_distance", pa.float32()),
        pa.field("out_of_distribution", pa.bool_()),
    ],
    metadata={"pdd_batch_schema": SCHEMA_VERSION, "table": "slices"},
)

# What a slices file holds: the rows without their image bytes (score queries never read PNGs);
# the heatmaps are a table of their own, joined by ``slice_key`` (``HEATMAPS_SCHEMA``).
SLICES_FILE_SCHEMA = pa.schema(
    [f for f in SLICES_SCHEMA if f.name != "heatmap_png"],
    metadata={"pdd_batch_schema": SCHEMA_VERSION, "table": "slices"},
)
HEATMAP_COLUMNS = ["schema_version", "slice_key", "series_key", "heatmap_png"]
HEATMAPS_SCHEMA = pa.schema(
    [SLICES_SCHEMA.field(c) for c in HEATMAP_COLUMNS],
    metadata={"pdd_batch_schema": SCHEMA_VERSION, "table": "heatmaps"},
)

STUDIES_SCHEMA = pa.schema(
    [
        pa.field("schema_version", pa.string(), nullable=False),
        pa.field("study_key", pa.string(), nullable=False),
        pa.field("n_series", pa.int32(), nullable=False),
        pa.field("n_slices", pa.int32(), nullable=False),
        pa.field("max_score", pa.float32(), nullable=False),
        pa.field("topk_mean", pa.float32(), nullable=False),
        pa.field("n_flagged", pa.int32(), nullable=False),
        # "flagged" | "normal" | "uncalibrated" | "out_of_distribution" (no in-distribution slice)
        pa.field("decision", pa.string(), nullable=False),
        pa.field("top_slice_key", pa.string()),
        pa.field("modality", pa.string()),
        pa.field("model_id", pa.string(), nullable=False),
        pa.field("checkpoint_hash", pa.string(), nullable=False),
        pa.field("run_id", pa.string(), nullable=False),
    ],
    metadata={"pdd_batch_schema": SCHEMA_VERSION, "table": "studies"},
)

ERRORS_SCHEMA = pa.schema(
    [
        pa.field("schema_version", pa.string(), nullable=False),
        pa.field("file_key", pa.string(), nullable=False),  # keyed digest of the relative path
        pa.field("series_key", pa.string()),
        pa.field("stage", pa.string(), nullable=False),  # discover | read | slice | score | write
        pa.field("status", pa.string(), nullable=False),  # skipped | failed
        pa.field("reason", pa.string(), nullable=False),
        pa.field("run_id", pa.string(), nullable=False),
    ],
    metadata={"pdd_batch_schema": SCHEMA_VERSION, "table": "errors"},
)

TABLES = {"slices": SLICES_SCHEMA, "studies": STUDIES_SCHEMA, "errors": ERRORS_SCHEMA}

# 1.0 column name -> 2.0 name, per table (1.0 held archive-relative paths there).
LEGACY_RENAMES = {"slices": {"source_file": "file_key"}, "errors": {"file": "file_key"}}


def _legacy(schema: pa.Schema, table: str) -> pa.Schema:
    back = {new: old for old, new in LEGACY_RENAMES.get(table, {}).items()}
    fields = [f.with_name(back.get(f.name, f.name)) for f in schema]
    return pa.schema(fields, metadata={"pdd_batch_schema": LEGACY_VERSION, "table": table})


LEGACY_TABLES = {name: _legacy(schema, name) for name, schema in TABLES.items()}
