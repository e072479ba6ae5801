"""The rows exchanged by read tasks, the predictor and the sink have one owner
(``pdd_batch.runs.rows``): each stage produces exactly the columns it declares (no Ray)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from dicom_factory import write_ct_series
from screen_support import make_checkpoint

from jobs.predictor import SlicePredictor, encode_heatmaps_fn
from jobs.read_task import read_series
from pdd_batch.ingest.discovery import discover
from pdd_batch.ingest.preprocess import PreprocessSpec
from pdd_batch.runs.rows import KIND_END, KIND_SLICE, READ_COLUMNS, SCORE_COLUMNS, SINK_COLUMNS


def test_each_stage_produces_the_declared_columns(tmp_path: Path) -> None:
    write_ct_series(tmp_path / "a", n_slices=3, rows=32, cols=32, seed=5)
    (ref,) = discover(tmp_path).series
    blocks = list(read_series(tmp_path, ref, PreprocessSpec(image_size=64), 2))
    assert [b["kind"][0] for b in blocks] == [KIND_SLICE, KIND_SLICE, KIND_END]
    assert all(tuple(b) == READ_COLUMNS for b in blocks)
    batch = {k: np.concatenate([np.asarray(b[k]) for b in blocks]) for k in READ_COLUMNS}
    scored = SlicePredictor(str(make_checkpoint(tmp_path / "ckpt")), device="cpu")(batch)
    assert set(scored) == (set(READ_COLUMNS) - {"image"}) | set(SCORE_COLUMNS)
    assert set(encode_heatmaps_fn(scored)) == set(SINK_COLUMNS)
