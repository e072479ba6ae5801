"""The row contract of a screening run: the one owner of the columns that read tasks, the
predictor and the driver's sink exchange (numpy columns of Ray Data batches).

A read task emits ``READ_COLUMNS`` (``slice_rows`` for slices, ``marker_row`` for a series'
end, empty or error marker: ``KIND_*``); the predictor drops ``image`` and adds
``SCORE_COLUMNS`` (``heatmap_u8``: the quantised map, (N, S, S)); the PNG stage turns
``heatmap_u8`` into ``heatmap_png``; the sink reads ``SINK_COLUMNS``.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from pdd_batch.ingest.series import SeriesRef

KIND_SLICE, KIND_END, KIND_ERROR, KIND_EMPTY = "slice", "end", "error", "empty"
READ_COLUMNS = (
    "kind",
    "series_key",
    "study_key",
    "modality",
    "volume_index",
    "slice_index",
    "source_file",
    "n_rows",
    "reason",
    "used_files",
    "unreadable_files",
    "image",
)
SCORE_COLUMNS = (
    "score",
    "heatmap_u8",
    "heatmap_max",
    "ood_distance",
    "model_id",
    "actor_pid",
    "actor_peak_rss_mb",
)
SINK_COLUMNS = tuple(
    c for c in (*READ_COLUMNS, *SCORE_COLUMNS, "heatmap_png") if c not in ("image", "heatmap_u8")
)


def marker_row(
    ref: SeriesRef,
    kind: str,
    reason: str,
    size: int,
    n_rows: int = 0,
    used_files: str = "",
    unreadable_files: str = "",
) -> dict[str, Any]:
    """The one row of a series' end (``KIND_END``), ``KIND_EMPTY`` or ``KIND_ERROR``."""
    return {
        "kind": [kind],
        "series_key": [ref.series_key],
        "study_key": [ref.study_key],
        "modality": [ref.modality or ""],
        "volume_index": np.array([-1], dtype=np.int32),
        "slice_index": np.array([-1], dtype=np.int32),
        "source_file": [""],
        "n_rows": np.array([n_rows], dtype=np.int32),
        "reason": [reason],
        "used_files": [used_files],
        "unreadable_files": [unreadable_files],
        "image": np.zeros((1, size, size), dtype=np.float32),
    }


def slice_rows(ref: SeriesRef, slices: list) -> dict[str, Any]:
    """A block of ``KIND_SLICE`` rows (``slices``: ``ingest.slicing.ModelSlice``)."""
    n = len(slices)
    return {
        "kind": [KIND_SLICE] * n,
        "series_key": [ref.series_key] * n,
        "study_key": [ref.study_key] * n,
        "modality": [ref.modality or ""] * n,
        "volume_index": np.array([s.volume_index for s in slices], dtype=np.int32),
        "slice_index": np.array([s.slice_index for s in slices], dtype=np.int32),
        "source_file": [s.source_file for s in slices],
        "n_rows": np.zeros(n, dtype=np.int32),  # the total comes with the end marker
        "reason": [""] * n,
        "used_files": [""] * n,
        "unreadable_files": [""] * n,
        "image": np.stack([s.image for s in slices]).astype(np.float32, copy=False),  # (N, S, S)
    }
