"""Site calibration (`calibrate --archive`): the split by study, the held-out false-positive
rates and their bootstrap intervals, the stored provenance, on synthetic DICOM studies screened
through the real pipeline (local Ray) and checked against an in-process reference."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from screen_support import direct_scores, make_checkpoint
from site_support import write_site_archive
from typer.testing import CliRunner

from pdd_batch.cli.app import app
from pdd_batch.evaluation.calibration import CalibrationError, threshold_at_fpr
from pdd_batch.evaluation.site_calibration import (
    SiteSlices,
    heldout_rates,
    site_calibration_record,
    split_studies,
    threshold_source,
)
from pdd_batch.ingest.discovery import discover

runner = CliRunner()


def _random_site(n_studies: int, seed: int) -> SiteSlices:
    """Studies of 2-7 slices, scores ~ N(study level, 1), a few slices out of distribution."""
    rng = np.random.default_rng(seed)
    keys, scores, ood = [], [], []
    for i in range(n_studies):
        n = int(rng.integers(2, 8))
        level = rng.normal(0, 0.5)
        keys += [f"study{i:03d}"] * n
        scores += (level + rng.normal(0, 1, n)).tolist()
        ood += (rng.random(n) < 0.1).tolist()
    return SiteSlices.of(keys, scores, ood)


def test_split_is_by_study_seeded_and_disjoint() -> None:
    keys = [f"s{i}" for i in range(20) for _ in range(3)]  # 20 studies, 3 slices each
    split = split_studies(keys, 0.3, seed=4)
    assert len(split.heldout) == 6 and len(split.calibration) == 14
    assert not set(split.heldout) & set(split.calibration)
    assert set(split.heldout) | set(split.calibration) == set(keys)
    assert split == split_studies(list(reversed(keys)), 0.3, seed=4)  # order-free, seeded
    assert split != split_studies(keys, 0.3, seed=5)
    assert split_studies(keys, 0.0, seed=4).heldout == ()
    assert len(split_studies(keys[:6], 0.01, seed=0).heldout) == 1  # at least one held out
    with pytest.raises(CalibrationError, match="at least 2"):
        split_studies(["only"] * 5, 0.3, seed=0)
    with pytest.raises(CalibrationError, match="holdout"):
        split_studies(keys, 1.0, seed=0)


def test_heldout_rates_count_studies_and_in_distribution_slices() -> None:
    site = _random_site(40, seed=1)
    held = sorted(set(site.study_keys.tolist()))[:15]
    # a held-out study whose only slice is out of distribution, with a huge score: never counted
    site = SiteSlices.of(
        [*site.study_keys.tolist(), "zz-ood"],
        [*site.scores.tolist(), 99.0],
        [*(~site.in_distribution).tolist(), True],
    )
    threshold = 1.2
    rates = heldout_rates(site, [*held, "zz-ood"], threshold, n_boot=500, seed=0)
    per_study = {}
    for k, s, ok in zip(site.study_keys, site.scores, site.in_distribution, strict=True):
        if k in held and ok:
            per_study.setdefault(k, []).append(s > threshold)
    assert rates["n_studies"] == len(per_study) and rates["n_not_assessed"] == 1
    assert rates["study_fpr"] == pytest.approx(np.mean([any(v) for v in per_study.values()]))
    flat = [f for v in per_study.values() for f in v]
    assert rates["slice_fpr"] == pytest.approx(np.mean(flat))
    assert rates["n_slices"] == len(flat) and rates["n_flagged_slices"] == sum(flat)
    for name in ("study_fpr", "slice_fpr"):
        lo, hi = rates[f"{name}_ci95"]
        assert 0.0 <= lo <= rates[name] <= hi <= 1.0 and lo < hi
    again = heldout_rates(site, [*held, "zz-ood"], threshold, n_boot=500, seed=0)
    assert again == rates  # seeded


def test_record_sets_the_threshold_on_calibration_studies_only() -> None:
    site = _random_site(30, seed=2)
    record, split = site_calibration_record(site, 0.1, holdout=0.3, seed=7, n_boot=300)
    calib = np.isin(site.study_keys, split.calibration) & site.in_distribution
    assert record["threshold"] == threshold_at_fpr(site.scores[calib], 0.1)
    assert record["n_normals"] == calib.sum() == record["site"]["calibration_slices"]
    assert record["source"] == "site" and record["date"]
    assert record["site"]["heldout_study_keys"] == list(split.heldout)
    assert record["site"]["n_studies"] == 30 and record["site"]["calibration_studies"] == 21
    assert record["site"]["heldout"]["n_studies"] <= 9
    no_holdout, _ = site_calibration_record(site, 0.1, holdout=0.0, seed=7)
    assert no_holdout["site"]["heldout"] is None


def test_threshold_source_reads_old_and_new_calibrations() -> None:
    assert threshold_source(None) == "uncalibrated"
    old = {"method": "fpr", "fpr": 0.05, "threshold": 4.5, "n_normals": 200, "split": "val"}
    assert threshold_source(old) == "development set"  # checkpoints before site calibration
    assert threshold_source({**old, "source": "site"}) == "site"


def test_warning_names_the_models_that_screened_without_a_site_threshold() -> None:
    from pdd_batch.review.site_note import threshold_warning, threshold_warning_html

    models = [
        {"model_id": "head-a", "threshold_source": "development set", "series_routed": 3},
        {"model_id": "chest-b", "threshold_source": "uncalibrated", "series_routed": 0},
        {"model_id": "site-c", "threshold_source": "site", "series_routed": 2},
    ]
    text = threshold_warning({"models": models})
    assert text is not None and "head-a (development set)" in text
    assert "chest-b" not in text and "site-c" not in text  # unused, or set on site data
    assert "calibrate" in text and 'id="site-calibration"' in threshold_warning_html(
        {"models": models}
    )
    assert threshold_warning({"models": models[2:]}) is None
    old = {"models": [{"model_id": "x", "threshold": 4.5, "series_routed": 1}]}  # before 1.x
    assert threshold_warning(old) is None and threshold_warning_html(old) == ""


def _study_of_slices(archive: Path) -> dict[str, str]:
    """series key -> study key of the archive (keys as the screen makes them)."""
    return {ref.series_key: ref.study_key for ref in discover(archive).series}


@pytest.fixture
def ray_local(shared_ray):
    """The session's shared local Ray (conftest ``shared_ray``; token auth, loopback only,
    private temp folder): the commands of the tests join it, no start per command."""
    from ray_support import use_shared_ray

    use_shared_ray()


@pytest.mark.ray
@pytest.mark.slow
def test_calibrate_archive_on_synthetic_studies(tmp_path: Path, ray_local) -> None:
    archive = tmp_path / "normals"
    uids = write_site_archive(archive, 10)
    # a threshold from a development set (no in-distribution check): screen and report warn
    ckpt = make_checkpoint(tmp_path / "ckpt", threshold=0.5)
    assert "threshold not set on this site's data" in _screen_and_report(archive, ckpt, tmp_path)
    r = runner.invoke(
        app,
        ["calibrate", str(archive), "--archive", "--model", str(ckpt), "--fpr", "0.1",
         "--holdout", "0.3", "--seed", "3", "--num-cpus", "2", "--bootstrap", "500"],
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    assert not any(uid in r.output for uid in uids)
    rec = json.loads((ckpt / "config.json").read_text())["calibration"]
    site = rec["site"]
    assert rec["source"] == "site" and site["n_studies"] == 10
    assert site["calibration_studies"] == 7 and site["heldout"]["n_studies"] == 3
    # the reference: the same files scored in this process, split by the stored held-out keys
    study_of = _study_of_slices(archive)
    ref = direct_scores(archive, ckpt)
    by_study: dict[str, list[float]] = {}
    for slice_key, score in ref.items():
        by_study.setdefault(study_of[slice_key.split(":")[0]], []).append(score)
    held = set(site["heldout_study_keys"])
    calibration = set(by_study) - held
    assert held < set(by_study) and len(calibration) == 7  # no study on both sides
    calib_scores = [s for k in calibration for s in by_study[k]]
    assert site["calibration_slices"] == len(calib_scores)
    assert rec["threshold"] == pytest.approx(threshold_at_fpr(calib_scores, 0.1), rel=1e-5)
    thr = rec["threshold"]
    expect_study = np.mean([max(by_study[k]) > thr for k in held])
    expect_slice = np.mean([s > thr for k in held for s in by_study[k]])
    assert site["heldout"]["study_fpr"] == pytest.approx(expect_study)
    assert site["heldout"]["slice_fpr"] == pytest.approx(expect_slice)
    lo, hi = site["heldout"]["study_fpr_ci95"]
    assert 0.0 <= lo <= expect_study <= hi <= 1.0
    assert "held out" in r.output and "study FPR" in r.output
    # doctor shows where the threshold came from
    r = runner.invoke(app, ["doctor", "--json", "--model", str(ckpt)])
    assert r.exit_code == 0, r.output
    note = json.loads(r.output)["weights"][f"model {ckpt.name}"]["note"]
    assert "from site data (7 studies" in note and "study FPR" in note
    # screened again with the site's threshold: no warning in the summary or the report
    assert "threshold not set" not in _screen_and_report(archive, ckpt, tmp_path)


def _screen_and_report(archive: Path, ckpt: Path, tmp_path: Path) -> str:
    """`screen` then `report` of the archive with ``ckpt``: the summary and the report HTML
    (asserting that the report's warning block says what the summary says)."""
    out, html_file = tmp_path / "run", tmp_path / "report.html"
    r = runner.invoke(
        app, ["screen", str(archive), "--out", str(out), "--model", str(ckpt), "--num-cpus", "2"]
    )
    assert r.exit_code == 0, r.output
    manifest = json.loads((out / "manifest.json").read_text())
    assert {m["threshold_source"] for m in manifest["models"]} <= {"site", "development set"}
    r2 = runner.invoke(app, ["report", str(out), "--out", str(html_file), "--heatmaps-only"])
    assert r2.exit_code == 0, r2.output
    page = html_file.read_text()
    warned = 'id="site-calibration"' in page
    assert warned == ("threshold not set on this site" in r.output)
    return " ".join(r.output.split())
