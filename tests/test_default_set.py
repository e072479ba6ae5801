"""The embedded default set: a head-CT model and a chest-radiograph model, routed by scope when
``screen`` is given no ``--model`` (the real embedded checkpoints, on a real local Ray)."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from dicom_factory import write_ct_series, write_xray
from scope_support import tag

from model.default import (
    DEFAULT_CHEST_MODEL_DIR,
    DEFAULT_MODEL_DIR,
    default_model_path,
    default_model_paths,
)

MAX_DEFAULT_BYTES = 25 * 1024 * 1024  # issue 14: the default set under 25 MB together


def _meta(folder: Path) -> dict:
    return json.loads((folder / "config.json").read_text(encoding="utf-8"))


def test_default_set_is_head_ct_then_chest_xray() -> None:
    assert default_model_paths() == [DEFAULT_MODEL_DIR, DEFAULT_CHEST_MODEL_DIR]
    assert default_model_path() == DEFAULT_MODEL_DIR  # one-model commands keep the head-CT one
    head, chest = (_meta(p) for p in default_model_paths())
    assert head["model_id"] != chest["model_id"]
    assert (head["scope"]["modalities"], head["scope"]["body_parts"]) == (["CT"], ["HEAD"])


def test_head_ct_default_is_trained_with_trains_default_recipe() -> None:
    """Issue 17/23: the embedded head-CT default follows ``train``'s defaults: its config is the
    one selection kept (recorded in ``training.selection``) or, for a checkpoint trained before
    selection existed, the documented default candidate; its augmentation is ``train``'s."""
    import inspect

    from model.config import get_config
    from pdd_batch.cli.train import SELECTION_CANDIDATES, train_command

    params = inspect.signature(train_command).parameters
    meta = _meta(DEFAULT_MODEL_DIR)
    stored = meta["model_config"]
    chosen = (meta["training"].get("selection") or {}).get("chosen", SELECTION_CANDIDATES[0])
    assert params["config"].default is None and chosen in SELECTION_CANDIDATES
    wanted = get_config(chosen, image_size=128).to_dict()
    teachers = ("cnn_teacher", "mamba_teacher")  # stored ones also record resolved hashes
    assert {k: v for k, v in stored.items() if k not in teachers} == {
        k: v for k, v in wanted.items() if k not in teachers
    }
    for role in teachers:
        assert {k: stored[role][k] for k in ("name", "source", "arch", "seed")} == {
            k: wanted[role][k] for k in ("name", "source", "arch", "seed")
        }
    assert meta["training"]["run"]["augment_views"] == params["augment_views"].default


def test_head_default_framed_as_train_frames_its_scope() -> None:
    """Issue 22: the head-CT default was trained with ``train``'s default framing for its scope
    (CT: ``ct-head-v1``), so screening frames raw DICOM like its training images."""
    import inspect

    from pdd_batch.cli.train import train_command
    from pdd_batch.ingest.framing import resolve_framing

    default = inspect.signature(train_command).parameters["framing"].default
    meta = _meta(DEFAULT_MODEL_DIR)
    assert meta["preprocessing"].get("framing") == "ct-head-v1"
    assert resolve_framing(default, meta["scope"]["modalities"]) == "ct-head-v1"


def test_chest_checkpoint_scope_calibration_and_check() -> None:
    meta = _meta(DEFAULT_CHEST_MODEL_DIR)
    scope = meta["scope"]
    assert scope["modalities"] == ["CR", "DX"] and scope["body_parts"] == ["CHEST"]
    assert scope["orientations"] == ["PA", "AP"]
    assert meta["preprocessing"]["image_size"] == meta["model_config"]["image_size"] == 128
    assert meta["model_config"]["map_sigma"] == 4.0 and meta["model_config"]["name"] == "lite0"
    calib = meta["calibration"]  # held-out normal patients, never the training ones
    assert calib["split"] == "val" and calib["n_normals"] > 100 and calib["fpr"] == 0.05
    assert meta["training"]["run"]["augment_views"] == 0 and meta["training"]["n_images"] > 500
    assert meta["ood"]["n_train"] == meta["training"]["n_images"]


def test_chest_checkpoint_loads_and_scores() -> None:
    import torch

    from model.checkpoint import load_checkpoint

    loaded = load_checkpoint(DEFAULT_CHEST_MODEL_DIR)
    out = loaded.model.predict(torch.rand(2, 1, 128, 128))
    assert out.scores.shape == (2,) and torch.isfinite(out.scores).all()
    assert loaded.ood is not None


def test_both_default_folders_together_under_25_mb() -> None:
    files = [f for folder in default_model_paths() for f in folder.rglob("*") if f.is_file()]
    total = sum(f.stat().st_size for f in files)
    assert 0 < total < MAX_DEFAULT_BYTES


@pytest.fixture(scope="module")
def ray_local(shared_ray):
    """The session's shared local Ray (conftest ``shared_ray``; token auth, loopback only,
    private temp folder): the commands of the tests join it, no start per command."""
    from ray_support import use_shared_ray

    use_shared_ray()


@pytest.mark.ray
@pytest.mark.slow
def test_screen_without_model_routes_ct_head_and_cr_chest(ray_local, tmp_path: Path) -> None:
    from jobs.screen import run_screen
    from pdd_batch.ingest.keys import file_key
    from pdd_batch.runs.config import RunConfig

    archive = tmp_path / "archive"
    head = write_ct_series(archive / "ct_head", n_slices=3, rows=32, cols=32, seed=1)
    tag(head, BodyPartExamined="HEAD")
    cr = write_xray(archive / "cr_chest" / "cr.dcm", rows=48, cols=40, modality="CR", seed=4)
    tag([cr], BodyPartExamined="CHEST", ViewPosition="PA", PatientAge="004Y")
    # an adult's chest radiograph: outside the chest default's population (children aged 1-5)
    adult = write_xray(archive / "cr_adult" / "cr.dcm", rows=48, cols=40, modality="CR", seed=5)
    tag([adult], BodyPartExamined="CHEST", ViewPosition="PA", PatientAge="045Y")
    mr = write_ct_series(archive / "mr", n_slices=2, rows=32, cols=32, modality="MR", seed=3)
    tag(mr, BodyPartExamined="BRAIN")
    out = tmp_path / "out"
    m = run_screen(RunConfig(archive=archive, out_dir=out, batch_size=4)).manifest  # no --model
    ids = [_meta(p)["model_id"] for p in default_model_paths()]
    assert [e["model_id"] for e in m["models"]] == ids
    assert [e["series_routed"] for e in m["models"]] == [1, 1]
    assert m["series_out_of_scope"] == 2 and m["inputs_out_of_scope"] == 3
    assert m["status"] == "complete" and m["inputs_lost"] == 0
    errors = pq.read_table(out / "errors").to_pandas().set_index("file_key")
    row = errors.loc[file_key(adult.relative_to(archive).as_posix())]
    assert row["status"] == "skipped" and row["reason"].startswith("outside every model's scope")
    assert "age outside its range" in row["reason"] and "45" not in row["reason"]
    folder = {file_key(p.relative_to(archive).as_posix()): p.parent.name for p in [*head, cr]}
    rows = pq.read_table(out / "slices").to_pylist()
    got = {(folder[r["file_key"]], r["model_id"]) for r in rows}
    assert got == {("ct_head", ids[0]), ("cr_chest", ids[1])}
    studies = pq.read_table(out / "studies").to_pylist()
    assert sorted(s["model_id"] for s in studies) == sorted(ids)
