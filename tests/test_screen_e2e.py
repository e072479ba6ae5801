"""End-to-end screening on a real local Ray cluster with the test-sized PDD model.

One synthetic archive (DICOM CT series, enhanced MR, 3D/4D NIfTI, an SR, corrupt/truncated/text
files) is screened several times: first run, incremental rerun, a changed series, ``--force``,
and a run whose model actor crashes once mid-run.
"""

from __future__ import annotations

import json
from pathlib import Path

import duckdb
import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from screen_support import IMAGE_SIZE, direct_scores, make_archive, make_checkpoint

from jobs.screen import CRASH_ONCE_ENV, CRASH_ONCE_READ_ENV, run_screen
from pdd_batch.ingest.keys import file_key
from pdd_batch.runs.config import RunConfig
from pdd_batch.runs.heatmap import decode_heatmap
from pdd_batch.runs.results import open_run

pytestmark = [pytest.mark.ray, pytest.mark.slow]


@pytest.fixture(scope="module")
def ray_local(shared_ray):
    """The session's shared local Ray (conftest ``shared_ray``; token auth, loopback only,
    private temp folder): the commands of the tests join it, no start per command."""
    from ray_support import use_shared_ray

    use_shared_ray()


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict:
    from model.checkpoint import set_calibration

    base = tmp_path_factory.mktemp("screen")
    archive = make_archive(base / "archive")
    ckpt = make_checkpoint(base / "ckpt")
    ref = direct_scores(archive, ckpt)
    threshold = float(np.median(list(ref.values())))
    set_calibration(
        ckpt,
        {
            "method": "fpr",
            "fpr": 0.5,
            "threshold": threshold,
            "n_normals": len(ref),
            "split": "val",
            "data": "synthetic",
        },
    )
    return {"base": base, "archive": archive, "ckpt": ckpt, "ref": ref, "threshold": threshold}


def _run(world: dict, out: Path, **kw) -> dict:
    cfg = RunConfig(
        archive=world["archive"],
        out_dir=out,
        model_path=world["ckpt"],
        batch_size=4,
        rows_per_file=16,
        **kw,
    )
    result = run_screen(cfg)
    assert json.loads((out / "manifest.json").read_text())["run_id"] == cfg.run_id
    return result.manifest


def _check_accounting(m: dict, out: Path) -> None:
    assert m["inputs_seen"] == m["inputs_scored"] + m["inputs_skipped"] + m["inputs_failed"]
    assert m["inputs_lost"] == 0 and m["status"] == "complete" and m["exit_code"] == 0
    errors = pq.read_table(out / "errors").to_pandas()
    assert len(errors) == m["inputs_skipped"] + m["inputs_failed"]  # one row per unscored file
    assert errors["file_key"].is_unique


def test_first_run_accounts_for_every_input_and_matches_direct_predict(ray_local, world):
    out = world["base"] / "run"
    m = _run(world, out)
    _check_accounting(m, out)
    errors = pq.read_table(out / "errors").to_pandas().set_index("file_key")
    assert errors.loc[file_key("bad/corrupt.dcm"), "status"] in ("failed", "skipped")
    assert errors.loc[file_key("bad/README.txt"), "status"] == "skipped"
    assert errors.loc[file_key("docs/report.dcm"), "status"] == "skipped"
    trunc = errors.loc[file_key("trunc/IM0001.dcm")]
    assert trunc["stage"] == "read"  # decode failed in the worker
    assert "trunc" not in trunc["reason"] and "IM0001" not in trunc["reason"]
    slices = pq.read_table(out / "slices").to_pandas()
    assert slices["slice_key"].is_unique
    ref = world["ref"]
    assert set(slices["slice_key"]) == set(ref)  # every readable slice, and only those
    got = slices.set_index("slice_key")["score"]
    want = pd.Series(ref)[got.index]
    np.testing.assert_allclose(got.to_numpy(), want.to_numpy(), rtol=1e-4, atol=1e-5)
    assert (slices["flagged"] == (slices["score"] > world["threshold"])).all()
    row = open_run(out).slices.to_pandas().iloc[0]  # heatmaps (a table of their own) joined
    amap = decode_heatmap(row["heatmap_png"], row["heatmap_max"])
    assert amap.shape == (IMAGE_SIZE, IMAGE_SIZE) and amap.max() > 0
    assert set(slices["checkpoint_hash"]) == {m["checkpoint_hash"]}
    studies = pq.read_table(out / "studies").to_pandas().set_index("study_key")
    per_study = slices.groupby("study_key")["score"]
    np.testing.assert_allclose(studies["max_score"], per_study.max()[studies.index], rtol=1e-6)
    assert (studies["n_slices"] == per_study.size()[studies.index]).all()
    flagged = slices.groupby("study_key")["flagged"].sum()[studies.index]
    assert ((studies["decision"] == "flagged") == (flagged > 0)).all()
    # the three readers agree
    n_pd = len(pd.read_parquet(out / "slices"))
    n_db = duckdb.sql(f"select count(*) from read_parquet('{out}/slices/*.parquet')").fetchall()
    assert n_pd == len(slices) == n_db[0][0] == m["slices_total"]


def test_rerun_is_incremental_changed_series_replaced_and_force_rescreens(ray_local, world):
    out = world["base"] / "run"
    if not (out / "manifest.json").exists():
        _run(world, out)
    before = pq.read_table(out / "slices").to_pandas()
    m2 = _run(world, out)
    assert m2["series_screened_this_run"] == 0 and m2["series_reused"] > 0
    _check_accounting(m2, out)
    after = pq.read_table(out / "slices").to_pandas()
    assert sorted(after["slice_key"]) == sorted(before["slice_key"])
    assert set(after["run_id"]) == set(before["run_id"])  # nothing rewritten

    (world["archive"] / "ct1" / "IM0005.dcm").unlink()  # the series changed since
    m3 = _run(world, out)
    assert m3["series_screened_this_run"] == 1
    _check_accounting(m3, out)
    changed = pq.read_table(out / "slices").to_pandas()
    assert changed["slice_key"].is_unique and len(changed) == len(before) - 1

    m4 = _run(world, out, force=True)
    _check_accounting(m4, out)
    forced = pq.read_table(out / "slices").to_pandas()
    assert forced["slice_key"].is_unique and len(forced) == len(changed)
    assert set(forced["run_id"]) == {m4["run_id"]}


def test_actor_and_worker_crashes_are_retried_with_every_slice_once(ray_local, world, monkeypatch):
    marker, read_marker = world["base"] / "actor-crashed", world["base"] / "reader-crashed"
    monkeypatch.setenv(CRASH_ONCE_ENV, str(marker))  # an actor dies on its 2nd batch
    monkeypatch.setenv(CRASH_ONCE_READ_ENV, str(read_marker))  # a reader dies after a block
    out = world["base"] / "crash"
    m = _run(world, out)
    assert marker.exists() and read_marker.exists()  # both processes really died mid-run
    _check_accounting(m, out)
    slices = pq.read_table(out / "slices").to_pandas()
    assert slices["slice_key"].is_unique
    assert set(slices["slice_key"]) == set(direct_scores(world["archive"], world["ckpt"]))
