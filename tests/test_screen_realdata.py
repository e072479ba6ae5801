"""Screening a subset of the real DICOM data in ../shared/data/dicom (skips where absent):
a run of gantry-tilted head-CT slices (JPEG Lossless), the stray slice of another study, an
enhanced multi-frame MR and a 3-slice T1 series, linked (not copied) into a temp archive."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from conftest import shared_path
from screen_support import make_checkpoint

from jobs.screen import run_screen
from pdd_batch.runs.config import RunConfig

pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.realdata]
N_CT = 24


def _link_subset(dicom: Path, archive: Path) -> None:
    ct = sorted((dicom / "cq500_ct1_head_ct" / "series_4cc_D3D_0.625mm").glob("*.dcm"))[:N_CT]
    picks = [*ct, *(dicom / "cq500_ct1_head_ct" / "stray_other_study_2.5-5mm").glob("*.dcm")]
    picks += [dicom / "siemens_xa30_epi_sag_enhanced_multiframe" / "0063.dcm"]
    picks += sorted((dicom / "niivue_tcia_vs_seg_001_t1_3sl").glob("*.dcm"))
    for src in picks:
        dest = archive / src.parent.name / src.name
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.symlink_to(src)


def test_screen_real_dicom_subset(tmp_path: Path, shared_ray) -> None:
    dicom = shared_path("data", "dicom")
    archive = tmp_path / "archive"
    _link_subset(dicom, archive)
    ckpt = make_checkpoint(tmp_path / "ckpt")
    result = run_screen(
        RunConfig(
            archive=archive,
            out_dir=tmp_path / "out",
            model_path=ckpt,
            batch_size=8,
            follow_links_outside=True,  # the archive is links to ../shared/data
        )
    )
    m = result.manifest
    assert result.exit_code == 0 and m["inputs_lost"] == 0
    assert m["inputs_seen"] == N_CT + 1 + 1 + 3
    assert m["inputs_seen"] == m["inputs_scored"] + m["inputs_skipped"] + m["inputs_failed"]
    slices = pq.read_table(tmp_path / "out" / "slices").to_pandas()
    assert slices["slice_key"].is_unique and np.isfinite(slices["score"]).all()
    assert slices["series_key"].nunique() >= 3  # CT run, stray slice, MR multi-frame, T1
    assert len(slices) >= N_CT + 63
    manifest_text = (tmp_path / "out" / "manifest.json").read_text()
    assert json.loads(manifest_text)["status"] == "complete"
    text = manifest_text + slices.drop(columns=["heatmap_png"], errors="ignore").to_json()
    assert "CQ500" not in text and "VS-SEG" not in text  # no patient IDs in the outputs
