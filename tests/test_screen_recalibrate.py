"""A checkpoint recalibrated between two runs into the same folder (same weights, so the same
checkpoint hash): every slice row, old and new, must carry the new threshold and ``flagged`` by
``score > threshold``, and the study rollup (over both runs' series) must decide with it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from dicom_factory import write_ct_series
from screen_support import make_checkpoint

from jobs.screen import run_screen
from pdd_batch.runs.config import RunConfig

pytestmark = [pytest.mark.ray, pytest.mark.slow]


def _run(archive: Path, out: Path, ckpt: Path) -> None:
    cfg = RunConfig(archive=archive, out_dir=out, model_path=ckpt, num_cpus=2, batch_size=4)
    assert run_screen(cfg).exit_code == 0


def test_recalibrated_model_reflags_earlier_rows(tmp_path: Path, shared_ray) -> None:
    from model.checkpoint import set_calibration

    archive, out = tmp_path / "archive", tmp_path / "out"
    study = "1.2.826.0.1.3680043.8.498.1"  # both series of one study, screened in two runs
    write_ct_series(archive / "a", n_slices=3, rows=32, cols=32, seed=1, study_uid=study)
    ckpt = make_checkpoint(tmp_path / "ckpt")  # uncalibrated
    _run(archive, out, ckpt)
    first = pq.read_table(out / "slices").to_pandas()
    assert first["threshold"].isna().all() and not first["flagged"].any()
    threshold = float(np.median(first["score"]))
    calib = {"method": "fpr", "fpr": 0.5, "threshold": threshold, "n_normals": 3}
    set_calibration(ckpt, {**calib, "split": "val", "data": "synthetic"})
    write_ct_series(archive / "b", n_slices=3, rows=32, cols=32, seed=2, study_uid=study)
    _run(archive, out, ckpt)
    rows = pq.read_table(out / "slices").to_pandas()
    assert len(rows) == 6 and rows["slice_key"].is_unique
    assert (rows["threshold"] == threshold).all()
    assert (rows["flagged"] == (rows["score"] > threshold)).all()
    studies = pq.read_table(out / "studies").to_pandas()
    assert len(studies) == 1 and studies["n_series"][0] == 2 and studies["n_slices"][0] == 6
    assert studies["topk_mean"][0] == pytest.approx(rows["score"].nlargest(5).mean(), rel=1e-6)
    assert "uncalibrated" not in set(studies["decision"])
    for _, st in studies.iterrows():
        mine = rows[rows["study_key"] == st["study_key"]]
        assert st["n_flagged"] == int(mine["flagged"].sum())
        assert st["decision"] == ("flagged" if mine["flagged"].any() else "normal")
