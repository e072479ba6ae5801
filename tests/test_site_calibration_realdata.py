"""A site's first week on real DICOM from ../shared/data/dicom (skips where absent): `train
--archive` on axial brain MR studies, `calibrate --archive` on them plus a series outside the
model's scope (a CT slice), then `screen`: the screen's own rows reproduce the held-out
false-positive rates that calibration stored, and no warning is given."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from conftest import shared_path
from typer.testing import CliRunner

from pdd_batch.cli.app import app

pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.realdata]
runner = CliRunner()
AXIAL_MR = {  # folder -> files copied (each folder is one study)
    "ge_mr750_epi_fmri_15sl_x10vol": "*-0000[1-9].dcm",  # 9 single-slice files (of 150)
    "niivue_enhanced_mr_slice_timing": "*.dcm",  # enhanced MR, 6 frames
    "niivue_tcia_vs_seg_001_t1_3sl": "*.dcm",  # 3 T1 slices, 512x512
    "transfer_syntaxes_dcm_qa_ts/In": "1.dcm",  # one mosaic: 35 slices of 64x64
}
OUT_OF_SCOPE = {"cq500_ct1_head_ct/stray_other_study_2.5-5mm": "*.dcm"}  # CT: not its modality


def _copy(dicom: Path, picks: dict[str, str], archive: Path) -> None:
    for folder, pattern in picks.items():
        src = dicom / folder
        if not src.is_dir():
            pytest.skip(f"shared data not present: {src}")
        dest = archive / folder.replace("/", "_")
        dest.mkdir(parents=True)
        for f in sorted(src.glob(pattern)):
            shutil.copy(f, dest / f.name)


def _heldout_from_screen(run: Path, keys: list[str], threshold: float) -> tuple[float, float]:
    """(study FPR, slice FPR) of ``score > threshold`` on the held-out studies, from the rows
    the screen wrote (in-distribution slices only)."""
    rows = pq.read_table(run / "slices").to_pandas()
    rows = rows[rows["study_key"].isin(keys) & ~rows["out_of_distribution"].fillna(False)]
    flagged = rows["score"] > threshold
    per_study = flagged.groupby(rows["study_key"]).any()
    return float(per_study.mean()), float(flagged.mean())


def test_train_calibrate_screen_on_real_dicom(tmp_path: Path, shared_ray) -> None:
    dicom = shared_path("data", "dicom")
    normals, site = tmp_path / "normals", tmp_path / "site"
    _copy(dicom, AXIAL_MR, normals)
    _copy(dicom, AXIAL_MR, site)
    _copy(dicom, OUT_OF_SCOPE, site)
    ckpt, run = tmp_path / "ckpt", tmp_path / "run"
    train = ["train", str(normals), "--archive", "--config", "test", "--epochs", "2"]
    r = runner.invoke(app, [*train, "--batch-size", "8", "--out", str(ckpt)])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["calibrate", str(site), "--archive", "--model", str(ckpt),
                            "--holdout", "0.3", "--bootstrap", "500"])  # fmt: skip
    assert r.exit_code == 0, r.output
    screen = runner.invoke(app, ["screen", str(site), "--model", str(ckpt), "--out", str(run)])
    assert screen.exit_code == 0, screen.output
    rec = json.loads((ckpt / "config.json").read_text())["calibration"]
    s = rec["site"]
    assert rec["source"] == "site" and s["n_studies"] == len(AXIAL_MR)
    assert s["inputs"]["series_out_of_scope"] == len(OUT_OF_SCOPE)
    assert s["calibration_studies"] == 3 and len(s["heldout_study_keys"]) == 1
    held = s["heldout"]
    study_fpr, slice_fpr = _heldout_from_screen(run, s["heldout_study_keys"], rec["threshold"])
    assert held["study_fpr"] == pytest.approx(study_fpr)
    assert held["slice_fpr"] == pytest.approx(slice_fpr, abs=1e-6)
    assert np.isfinite(held["slice_fpr_ci95"]).all()
    manifest = json.loads((run / "manifest.json").read_text())
    assert [m["threshold_source"] for m in manifest["models"]] == ["site"]
    assert "threshold not set" not in screen.output
