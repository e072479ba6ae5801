"""Training, resume, evaluation and calibration end to end on synthetic images (test config)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from jobs.evaluate import calibrate_checkpoint, evaluate_checkpoint
from jobs.train import TrainConfig, TrainError, train_model
from model.checkpoint import load_checkpoint
from model.config import get_config
from pdd_batch.cli.app import app
from pdd_batch.evaluation.datasets import list_images
from tests.conftest import REPO_ROOT


def _write(path: Path, img: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray((np.clip(img, 0, 1) * 255).astype(np.uint8)).save(path)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Normals: a smooth disc with mild noise; anomalies: the disc plus a bright square."""
    root = tmp_path_factory.mktemp("synthetic")
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:80, :70] / 80.0
    for i in range(16):
        disc = ((yy - 0.5) ** 2 + (xx - 0.45) ** 2 < 0.12).astype(float) * 0.6
        img = disc + rng.normal(0, 0.03, disc.shape)
        if i >= 12:
            r, c = rng.integers(15, 45, size=2)
            img[r : r + 14, c : c + 14] = 1.0
            _write(root / "abnormal" / f"{i:02d}.png", img)
        else:
            _write(root / "normal" / f"{i:02d}.png", img)
    (root / "normal" / "broken.png").write_bytes(b"not a png")
    return root


def _run() -> TrainConfig:
    return TrainConfig(epochs=4, batch_size=4, seed=3, t_max=3)


def test_training_loss_falls_and_checkpoint_scores(dataset: Path, tmp_path: Path) -> None:
    torch.set_num_threads(1)
    items = list_images(dataset)
    res = train_model(items, tmp_path / "ck", get_config("test"), _run(), data_description="synth")
    assert res.n_images == 12 and res.epochs_run == 4
    assert [e["file"] for e in res.errors] == ["normal/broken.png"]
    assert res.epoch_losses[-1] < res.epoch_losses[0]
    loaded = load_checkpoint(tmp_path / "ck")
    assert loaded.preprocessing["image_size"] == 64
    assert loaded.meta["training"]["n_images"] == 12
    out = loaded.model.predict(torch.rand(2, 1, 64, 64))
    assert out.maps.shape == (2, 64, 64) and torch.isfinite(out.scores).all()
    with pytest.raises(TrainError, match="normal"):
        train_model([it for it in items if it.label == 1], tmp_path / "x", get_config("test"))


def test_augmented_views_are_seeded_and_keep_the_original_first() -> None:
    from jobs.train import augmented_views

    rng = np.random.default_rng(1)
    images = rng.random((3, 32, 32), dtype=np.float32)  # (N, S, S)
    views = augmented_views(images, 4, seed=7)  # (N * 4, S, S), image-major
    assert views.shape == (12, 32, 32) and views.dtype == np.float32
    np.testing.assert_array_equal(views[::4], images)  # view 0 of each image is the image
    assert all(not np.array_equal(views[i], images[i // 4]) for i in range(12) if i % 4)
    np.testing.assert_array_equal(views, augmented_views(images, 4, seed=7))
    assert not np.array_equal(views, augmented_views(images, 4, seed=8))


def test_training_with_augmented_views_is_reproducible(dataset: Path, tmp_path: Path) -> None:
    torch.set_num_threads(1)
    items = list_images(dataset)
    run = TrainConfig(epochs=3, batch_size=4, seed=3, t_max=3, augment_views=3)
    a = train_model(items, tmp_path / "a", get_config("test"), run)
    b = train_model(items, tmp_path / "b", get_config("test"), run)
    plain = train_model(items, tmp_path / "c", get_config("test"), _run())
    assert a.epoch_losses == b.epoch_losses and a.epoch_losses != plain.epoch_losses[:3]
    assert load_checkpoint(tmp_path / "a").meta["training"]["run"]["augment_views"] == 3
    with pytest.raises(TrainError, match="augment_views"):
        TrainConfig(augment_views=-1)


class _Interrupt(Exception):
    pass


def test_resume_continues_the_schedule(dataset: Path, tmp_path: Path) -> None:
    torch.set_num_threads(1)
    items = list_images(dataset)
    cfg = get_config("test")
    full = train_model(items, tmp_path / "full", cfg, _run())

    def stop_after_two(p) -> None:  # noqa: ANN001 - jobs.train.TrainProgress
        if p.step == 0 and p.epoch == 2 and p.phase == "train":
            raise _Interrupt

    with pytest.raises(_Interrupt):
        train_model(items, tmp_path / "part", cfg, _run(), progress=stop_after_two)
    state = torch.load(tmp_path / "part" / "resume.pt", weights_only=True)
    assert state["epoch"] == 2 and state["scheduler"]["last_epoch"] == 2
    resumed = train_model(items, tmp_path / "part", cfg, _run(), resume=True)
    assert resumed.epoch_losses == pytest.approx(full.epoch_losses, rel=1e-5)
    a = load_checkpoint(tmp_path / "full").model.state_dict()
    b = load_checkpoint(tmp_path / "part").model.state_dict()
    assert all(torch.allclose(a[k].float(), b[k].float(), atol=1e-5) for k in a)
    with pytest.raises(TrainError, match="batch_size"):
        train_model(items, tmp_path / "part", cfg, TrainConfig(epochs=5, batch_size=8, seed=3,
                    t_max=3), resume=True)  # fmt: skip


def test_cli_train_calibrate_evaluate(dataset: Path, tmp_path: Path) -> None:
    runner = CliRunner()
    ck = tmp_path / "ck"
    r = runner.invoke(app, ["train", str(dataset), "--config", "test", "--epochs", "3",
                            "--scope", "modality=CT,body_part=HEAD,orientation=axial",
                            "--batch-size", "4", "--map-sigma", "2.5",
                            "--out", str(ck)])  # fmt: skip
    assert r.exit_code == 0, r.output
    assert "12 images" in r.output and (ck / "model.safetensors").is_file()
    assert "model scope (--scope): CT, HEAD, axial" in r.output
    assert json.loads((ck / "config.json").read_text())["ood"]["n_train"] == 12
    assert json.loads((ck / "config.json").read_text())["model_config"]["map_sigma"] == 2.5
    split = tmp_path / "split.csv"
    rows = ["path,label,split"]
    for p in sorted((dataset / "normal").glob("[0-9]*.png")):
        rows.append(f"normal/{p.name},0,{'val' if int(p.stem) < 6 else 'test'}")
    rows += [f"abnormal/{p.name},1,test" for p in sorted((dataset / "abnormal").glob("*.png"))]
    split.write_text("\n".join(rows) + "\n")
    r = runner.invoke(app, ["calibrate", str(dataset), "--split-file", str(split), "--model",
                            str(ck), "--fpr", "0.2"])  # fmt: skip
    assert r.exit_code == 0, r.output
    calib = json.loads((ck / "config.json").read_text())["calibration"]
    assert calib["method"] == "fpr" and calib["n_normals"] == 6 and calib["split"] == "val"
    assert calib["observed_fpr"] <= 0.2
    r = runner.invoke(app, ["evaluate", str(dataset), "--split-file", str(split), "--model",
                            str(ck), "--out", str(tmp_path / "ev")])  # fmt: skip
    assert r.exit_code == 0, r.output
    m = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert all(0.0 <= m[k] <= 1.0 for k in ("auroc", "ap", "f1_max"))
    lo, hi = m["auroc_ci95"]
    assert lo <= m["auroc"] <= hi and "AUROC 95% CI" in r.output
    assert m["n_normal"] == 6 and m["n_anomalous"] == 4
    assert m["at_threshold"]["threshold"] == calib["threshold"]
    assert (tmp_path / "ev" / "evaluation.png").stat().st_size > 1000
    assert "floor: mean intensity" in r.output


def test_cli_reports_bad_layout(tmp_path: Path) -> None:
    r = CliRunner().invoke(app, ["train", str(tmp_path), "--out", str(tmp_path / "o")])
    assert r.exit_code == 2 and "no images" in r.output


def test_evaluate_with_masks_reports_pixel_metrics(dataset: Path, tmp_path: Path) -> None:
    torch.set_num_threads(1)
    items = list_images(dataset)
    train_model(items, tmp_path / "ck", get_config("test"), TrainConfig(epochs=1, batch_size=4))
    rows = ["path,label,split,mask"]
    for p in sorted((dataset / "abnormal").glob("*.png")):
        mask = (np.asarray(Image.open(p)) > 250).astype(float)
        _write(tmp_path / "masks" / p.name, mask)
        rows.append(f"{dataset}/abnormal/{p.name},1,test,{tmp_path}/masks/{p.name}")
    for p in sorted((dataset / "normal").glob("[0-9]*.png"))[:4]:
        _write(tmp_path / "masks" / f"n{p.name}", np.zeros((80, 70)))
        rows.append(f"{dataset}/normal/{p.name},0,test,{tmp_path}/masks/n{p.name}")
    (tmp_path / "split.csv").write_text("\n".join(rows) + "\n")
    test = list_images(dataset, tmp_path / "split.csv", "test")
    m = evaluate_checkpoint(test, tmp_path / "ev", tmp_path / "ck")
    assert 0 <= m["pixel_auroc"] <= 1 and 0 <= m["aupro"] <= 1
    rec = calibrate_checkpoint(test, tmp_path / "ck", 0.25, split="test")
    assert rec["n_normals"] == 4


def test_default_model_loads_and_scores() -> None:
    default = REPO_ROOT / "model" / "default_model"
    if not (default / "config.json").is_file():
        pytest.skip("no embedded default model committed yet")
    from model.default import default_model_path

    loaded = load_checkpoint(default_model_path())
    assert loaded.calibration is not None and loaded.calibration["method"] == "fpr"
    size = loaded.preprocessing["image_size"]
    out = loaded.model.predict(torch.rand(1, 1, size, size))
    assert out.maps.shape == (1, size, size) and torch.isfinite(out.scores).all()
    # the seeded VMamba comes from its stored copy, so other torch versions load the same model
    assert "stored copy" in loaded.model.teacher_mamba.provenance["weights"]
    total = sum(f.stat().st_size for f in default.iterdir())
    assert total <= 25 * 2**20


@pytest.mark.ray
@pytest.mark.slow
def test_training_runs_as_a_ray_actor(dataset: Path, tmp_path: Path, shared_ray) -> None:
    import ray

    from jobs.train import run_training

    seen = []
    address = ray.get_runtime_context().gcs_address
    res = run_training(list_images(dataset), tmp_path / "ck", get_config("test"),
                       TrainConfig(epochs=2, batch_size=4), address=address,
                       progress=seen.append)  # fmt: skip
    assert res.epochs_run == 2 and res.model is None and seen
    assert load_checkpoint(tmp_path / "ck").meta["training"]["epochs_run"] == 2


def test_train_from_an_archive_of_normal_studies(tmp_path: Path) -> None:
    import pydicom

    from tests.dicom_factory import write_corrupt_dicom, write_ct_series
    from tests.scope_support import tag

    s1 = write_ct_series(tmp_path / "arch" / "s1", n_slices=6, rows=40, cols=40, seed=1)
    tag(s1, PatientAge="006Y")  # s2: no PatientAge; its birth and study dates say 54 years
    s2 = write_ct_series(tmp_path / "arch" / "s2", n_slices=4, rows=40, cols=36, seed=2,
                         series_uid="1.2.3.4.5.6.7", study_uid="1.2.3.4.5.6")  # fmt: skip
    assert "PatientAge" not in pydicom.dcmread(s2[0])
    write_corrupt_dicom(tmp_path / "arch" / "bad.dcm")
    r = CliRunner().invoke(app, ["train", str(tmp_path / "arch"), "--archive", "--config", "test",
                                 "--epochs", "2", "--batch-size", "4", "--out",
                                 str(tmp_path / "ck")])  # fmt: skip
    assert r.exit_code == 0, r.output
    meta = load_checkpoint(tmp_path / "ck").meta["training"]
    assert meta["n_images"] == 10 and meta["epochs_run"] == 2
    assert meta["n_failed"] == 1 and "1 skipped" in r.output
    # the scope spans the training patients' ages (whole years), derived from the headers
    scope = load_checkpoint(tmp_path / "ck").meta["scope"]
    assert scope["age_range"] == [6, 54] and scope["age_fallback"] == "reject"
    assert "age 6-54 years" in r.output


def test_cli_trains_and_screens_with_site_supplied_teacher_weights(
    dataset: Path, tmp_path: Path
) -> None:
    """The path a site with the paper's weights takes (`train --teacher-weights cnn=… mamba=…`),
    on the test config's architectures: the files' weights are the teachers, the checkpoint
    records them by sha256, and a moved file is refused until pointed to."""
    import timm
    from safetensors.torch import save_file

    from jobs.predictor import SlicePredictor
    from model.teachers import TeacherSpec, build_teacher, file_sha256

    torch.manual_seed(11)
    cnn_state = timm.create_model("resnet18", pretrained=False).state_dict()  # classifier too
    torch.save({"state_dict": cnn_state}, tmp_path / "cnn.pth")
    mamba_spec = TeacherSpec("vm", "mamba", "random", "vmamba_small_fixture", seed=5)
    mamba_state = build_teacher(mamba_spec).backbone.state_dict()
    save_file({k: v.contiguous() for k, v in mamba_state.items()}, str(tmp_path / "vm.safetensors"))
    ck, runner = tmp_path / "ck", CliRunner()
    cnn_arg, mamba_arg = f"cnn={tmp_path / 'cnn.pth'}", f"mamba={tmp_path / 'vm.safetensors'}"
    weights = ["--teacher-weights", cnn_arg, "--teacher-weights", mamba_arg]
    r = runner.invoke(app, ["train", str(dataset), "--config", "test", "--epochs", "1",
                            "--scope", "modality=CT,body_part=HEAD",
                            "--batch-size", "4", "--out", str(ck), *weights])  # fmt: skip
    assert r.exit_code == 0, r.output
    recorded = json.loads((ck / "config.json").read_text())["teachers"]
    assert recorded["teacher_cnn"]["file_sha256"] == file_sha256(tmp_path / "cnn.pth")
    assert recorded["teacher_mamba"]["file_sha256"] == file_sha256(tmp_path / "vm.safetensors")
    assert not list(ck.glob("teacher_*.safetensors"))  # file teachers are referenced, not copied
    loaded = load_checkpoint(ck).model
    got_cnn = loaded.teacher_cnn.backbone.state_dict()
    assert all(torch.equal(v, cnn_state[k]) for k, v in got_cnn.items())
    got_mamba = loaded.teacher_mamba.backbone.state_dict()
    assert all(torch.equal(v, mamba_state[k]) for k, v in got_mamba.items())

    (tmp_path / "cnn.pth").rename(tmp_path / "moved.pth")
    evaluate = ["evaluate", str(dataset), "--model", str(ck), "--out", str(tmp_path / "ev")]
    r = runner.invoke(app, evaluate)
    assert r.exit_code == 1 and "--teacher-weights cnn=PATH" in r.output.replace("\n", "")
    r = runner.invoke(app, [*evaluate, "--teacher-weights", f"cnn={tmp_path / 'moved.pth'}"])
    assert r.exit_code == 0, r.output
    # screening checks the files on the driver, before a cluster starts: one clear line, exit 2
    r = runner.invoke(
        app, ["screen", "--sample", "--out", str(tmp_path / "run"), "--model", str(ck)]
    )
    assert r.exit_code == 2 and "TeacherWeightsError" in r.output
    assert "--teacher-weights cnn=PATH" in r.output.replace("\n", "")
    # screening actors take the new place too (RunConfig.teacher_weights → the actor's load)
    actor = SlicePredictor(str(ck), teacher_weights={"cnn": str(tmp_path / "moved.pth")})
    assert actor.checkpoint_hash == json.loads((ck / "config.json").read_text())["checkpoint_hash"]
    # a different file under the recorded name is refused by its sha256
    torch.save({"state_dict": {k: v + 1 for k, v in cnn_state.items()}}, tmp_path / "cnn.pth")
    r = runner.invoke(app, evaluate)
    assert r.exit_code == 1 and "sha256" in r.output
    r = runner.invoke(app, [*evaluate, "--teacher-weights", "tail=x.pth"])
    assert r.exit_code == 2 and "ROLE=PATH" in r.output


def test_cli_train_from_an_image_folder_needs_scope(dataset: Path, tmp_path: Path) -> None:
    out = ["--out", str(tmp_path / "ck"), "--config", "test", "--epochs", "1"]
    r = CliRunner().invoke(app, ["train", str(dataset), *out])
    assert r.exit_code == 2 and "--scope" in r.output and not (tmp_path / "ck").exists()
    r = CliRunner().invoke(app, ["train", str(dataset), *out, "--scope", "modality=CT"])
    assert r.exit_code == 2 and "body_part" in r.output
