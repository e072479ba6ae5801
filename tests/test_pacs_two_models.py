"""A two-model screen from a live Orthanc (tests/orthanc_server.py) exported back to it: one SR
and one KOS per model per study, each naming the model that scored it (id, checkpoint hash, its
own threshold) and stating its outcome; overlays point at their source slices; where dicom3tools
is installed, ``dciodvfy`` finds no error in any document as the PACS returns it."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pyarrow.parquet as pq
import pydicom
import pytest
import torch
from dicom_factory import write_ct_series, write_xray
from ray_support import use_shared_ray
from scope_support import CHEST_XR, HEAD_CT, tag
from screen_support import IMAGE_SIZE
from test_pacs_documents import kos_description, sr_items
from typer.testing import CliRunner

from pdd_batch.cli.app import app
from pdd_batch.ingest.dicomweb import PASSWORD_ENV, USER_ENV, Endpoint, Query, make_client

runner = CliRunner()
STUDY_UID = "1.2.826.0.1.3680043.8.498.424242"
THRESHOLDS = {"head": -1.0, "chest": -2.0}  # below every score: both models flag the study


def _checkpoint(out: Path, seed: int, scope, threshold: float) -> Path:
    """A test-size model of its own weights (hence its own model id) with a scope and a
    threshold."""
    from model.checkpoint import save_checkpoint, set_calibration, set_scope
    from model.config import get_config
    from model.pdd import build_model
    from pdd_batch.ingest.preprocess import PreprocessSpec

    torch.manual_seed(seed)
    model = build_model(get_config("test"))
    with torch.no_grad():  # the test model's init is fixed: nudge one weight per model
        next(p for p in model.parameters() if p.requires_grad).add_(1e-3 * seed)
    spec = PreprocessSpec(image_size=IMAGE_SIZE)
    ckpt = save_checkpoint(model, out, preprocessing=spec.to_dict())
    set_scope(ckpt, scope.to_dict())
    calib = {"method": "fpr", "fpr": 0.05, "threshold": threshold, "n_normals": 1}
    set_calibration(ckpt, {**calib, "split": "val", "data": "synthetic"})
    return ckpt


@pytest.fixture(scope="module")
def exported(orthanc, tmp_path_factory, shared_ray) -> dict:  # noqa: F811
    from jobs.dicomweb_fetch import screen_pacs
    from pdd_batch.runs.config import RunConfig

    base = tmp_path_factory.mktemp("two_models")
    archive = base / "archive"
    head = write_ct_series(
        archive / "head", n_slices=3, rows=32, cols=32, seed=41, study_uid=STUDY_UID
    )
    tag(head, BodyPartExamined="HEAD")
    cr = write_xray(archive / "cr" / "cr.dcm", rows=48, cols=40, modality="CR", study_uid=STUDY_UID)
    tag([cr], BodyPartExamined="CHEST", ViewPosition="PA")
    orthanc.clear()  # the session's one Orthanc: only this module's study on it
    orthanc.upload(sorted(archive.rglob("*.dcm")))
    models = {
        "head": _checkpoint(base / "head_model", 1, HEAD_CT, THRESHOLDS["head"]),
        "chest": _checkpoint(base / "chest_model", 2, CHEST_XR, THRESHOLDS["chest"]),
    }
    endpoint = Endpoint(
        orthanc.http_url + "/dicom-web", orthanc.user, orthanc.password, backoff_ms=50
    )
    out = base / "run"
    cfg = RunConfig(
        archive=out / "unused",
        out_dir=out,
        model_path=models["head"],
        more_models=(models["chest"],),
        batch_size=4,
        rows_per_file=16,
    )
    use_shared_ray()
    result = screen_pacs(cfg, endpoint, Query(study_uids=(STUDY_UID,)))
    assert result.screen.exit_code == 0
    mp = pytest.MonkeyPatch()
    mp.setenv(USER_ENV, orthanc.user)
    mp.setenv(PASSWORD_ENV, orthanc.password)
    mp.setenv("HOME", "/nonexistent")
    try:
        args = ["export", str(out), "--to", orthanc.dicomweb_url, "--secondary-capture"]
        cli = runner.invoke(app, args)
    finally:
        mp.undo()
    assert cli.exit_code == 0, cli.output
    return {"out": out, "client": make_client(endpoint), "base": base}


def _documents(client, modality: str) -> list[pydicom.Dataset]:
    out = []
    for series in client.search_for_series(
        study_instance_uid=STUDY_UID, search_filters={"Modality": modality}
    ):
        series_uid = series["0020000E"]["Value"][0]
        for item in client.search_for_instances(
            study_instance_uid=STUDY_UID, series_instance_uid=series_uid
        ):
            sop = item["00080018"]["Value"][0]
            out.append(client.retrieve_instance(STUDY_UID, series_uid, sop))
    return out


def test_each_model_has_its_own_sr_and_kos_naming_it_and_its_threshold(exported) -> None:
    studies = pq.read_table(exported["out"] / "studies").to_pylist()
    assert len(studies) == 2 and {s["decision"] for s in studies} == {"flagged"}
    by_model = {s["model_id"]: s for s in studies}
    assert len(by_model) == 2
    srs = _documents(exported["client"], "SR")
    assert len(srs) == 2
    named = {}
    for sr in srs:
        items = sr_items(sr)
        (model_id,) = items["Model id"]
        named[model_id] = items
        assert items["Checkpoint hash"] == [by_model[model_id]["checkpoint_hash"]]
        assert items["Study outcome"] == ["flagged"]
        assert model_id in sr.SeriesDescription
    assert set(named) == set(by_model)
    thresholds = {m: items["Decision threshold"][0] for m, items in named.items()}
    assert sorted(thresholds.values()) == sorted(THRESHOLDS.values())
    for model_id, study in by_model.items():
        assert thresholds[model_id] == pytest.approx(study["threshold"])
    koses = _documents(exported["client"], "KO")
    assert len(koses) == 2
    described = {m for kos in koses for m in by_model if f"({m})" in kos_description(kos)}
    assert described == set(by_model)
    assert all("flagged images" in kos_description(kos) for kos in koses)
    assert len({kos.SeriesInstanceUID for kos in koses}) == 2


def test_overlays_point_at_their_source_slices(exported) -> None:
    client = exported["client"]
    sources = {ds.SOPInstanceUID: ds for m in ("CT", "CR") for ds in _documents(client, m)}
    overlays = _documents(client, "OT")
    assert overlays
    for sc in overlays:
        (ref,) = sc.SourceImageSequence
        source = sources[ref.ReferencedSOPInstanceUID]
        assert ref.ReferencedSOPClassUID == source.SOPClassUID
        assert f"source image {source.InstanceNumber} " in sc.ImageComments


@pytest.mark.skipif(shutil.which("dciodvfy") is None, reason="dciodvfy (dicom3tools) absent")
def test_dciodvfy_finds_no_error_in_the_documents_the_pacs_returns(exported, tmp_path) -> None:
    client = exported["client"]
    for modality in ("SR", "KO", "OT"):
        for i, ds in enumerate(_documents(client, modality)):
            path = tmp_path / f"{modality}{i}.dcm"
            ds.save_as(path, enforce_file_format=True)
            run = subprocess.run(
                ["dciodvfy", str(path)], capture_output=True, text=True, timeout=60
            )
            errors = [ln for ln in (run.stdout + run.stderr).splitlines() if ln.startswith("Error")]
            assert not errors, (modality, errors)
