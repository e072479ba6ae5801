"""A series reformatted to the model's axis (a sagittal acquisition sliced axially): every output
slice mixes pixels of all its files, so every file counts as scored, none as skipped."""

from __future__ import annotations

from pathlib import Path

import pyarrow.parquet as pq
import pytest
from dicom_factory import write_ct_series
from screen_support import make_checkpoint

from jobs.screen import run_screen
from pdd_batch.runs.config import RunConfig

pytestmark = [pytest.mark.ray, pytest.mark.slow]


def test_reformatted_series_counts_every_file_scored(tmp_path: Path, shared_ray) -> None:
    archive = tmp_path / "archive"
    files = write_ct_series(
        archive / "sag", n_slices=20, rows=24, cols=24, seed=5, orientation="sagittal"
    )
    ckpt = make_checkpoint(tmp_path / "ckpt")
    cfg = RunConfig(
        archive=archive, out_dir=tmp_path / "out", model_path=ckpt, num_cpus=2, batch_size=8
    )
    result = run_screen(cfg)
    m = result.manifest
    assert result.exit_code == 0
    rows = pq.read_table(tmp_path / "out" / "slices").num_rows
    assert rows == 24  # reformatted: one slice per sagittal column, not per file
    assert (m["inputs_seen"], m["inputs_scored"], m["inputs_skipped"]) == (len(files), 20, 0)
    assert pq.read_table(tmp_path / "out" / "errors").num_rows == 0
