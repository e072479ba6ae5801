"""Selection inside `pdd-batch train` and `evaluate --synthetic` (issue 23), at test size."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from jobs.selection import CANDIDATES, Candidate, holdout_items, run_selection
from jobs.train import TrainConfig
from model.checkpoint import load_checkpoint
from model.config import get_config
from pdd_batch.cli.app import app
from pdd_batch.cli.train import SELECTION_CANDIDATES
from pdd_batch.evaluation.datasets import ImageItem, list_images

SCOPE = ["--scope", "modality=CT,body_part=HEAD,orientation=axial"]


def _phantoms(root: Path, n_train: int, n_val: int, size: int = 64) -> Path:
    """Normal 'head' phantoms (a disc with a bright rim) and ``split.csv``: train and val normals,
    and test rows that name files which do not exist: reading one would fail the run."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:size, :size]
    rows = ["path,label,split"]
    for i in range(n_train + n_val):
        r = size * 0.35 + rng.uniform(-1, 1)
        d = np.hypot(yy - size / 2, xx - size / 2)
        img = (d < r) * (0.45 + rng.normal(0, 0.03, d.shape)) + (np.abs(d - r) < size / 32) * 0.4
        (root / "normal").mkdir(parents=True, exist_ok=True)
        Image.fromarray((np.clip(img, 0, 1) * 255).astype(np.uint8)).save(
            root / f"normal/{i:02d}.png"
        )
        rows.append(f"normal/{i:02d}.png,0,{'train' if i < n_train else 'val'}")
    rows += ["normal/never_read.png,0,test", "abnormal/never_read.png,1,test"]
    (root / "split.csv").write_text("\n".join(rows) + "\n")
    return root


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _phantoms(tmp_path_factory.mktemp("phantoms"), n_train=24, n_val=10)


def test_selection_keeps_the_trained_candidate_over_a_crippled_one(
    phantoms: Path, tmp_path: Path
) -> None:
    """Two candidates of one architecture: one trained, one left at its random head (lr 1e-9,
    one epoch). The figure on the held-out val normals must prefer the trained one; the split's
    test rows point to missing files, so reading any of them would have failed the run."""
    items = list_images(phantoms, phantoms / "split.csv", splits=("train", "val"))
    cfg = get_config("rd4ad", image_size=64)
    cands = [Candidate("crippled", cfg, TrainConfig(epochs=1, lr=1e-9)), Candidate("trained", cfg)]
    seen: set[str] = set()
    sel = run_selection(items, tmp_path / "ck", cands, TrainConfig(epochs=10, seed=0),
                        progress=lambda name, p: seen.add(name))  # fmt: skip
    rows = {r["config"]: r for r in sel.record["candidates"]}
    assert sel.chosen == "trained" and seen == {"crippled", "trained"}
    assert sel.record["versus_default"]["ci95"][0] > 0  # clearly better than the default
    assert rows["trained"]["figure"]["auroc"] > rows["crippled"]["figure"]["auroc"]
    for r in rows.values():
        lo, hi = r["figure"]["ci95"]
        assert lo <= r["figure"]["auroc"] <= hi and r["figure"]["n_normal"] == 10
        assert r["n_train"] == 24  # the val rows were held out of training
    meta = load_checkpoint(tmp_path / "ck").meta
    assert meta["training"]["selection"]["chosen"] == "trained"
    assert meta["training"]["selection"]["holdout"] == "the split file's val rows"
    assert meta["training"]["run"]["epochs"] == 10  # the kept checkpoint is the trained one
    card = (tmp_path / "ck" / "model_card.md").read_text()
    assert "`crippled`" in card and "`trained`" in card and "**`trained`**" in card
    assert not (tmp_path / "ck" / "candidates").exists()


def test_train_selects_by_default_and_never_reads_test_rows(phantoms: Path, tmp_path: Path) -> None:
    """`pdd-batch train DATA --split-file …` without --config runs selection (here one test-sized
    candidate), prints each figure and records it; the test rows' files do not exist;
    `--keep-candidates` leaves each candidate's checkpoint beside the kept one."""
    out, split = tmp_path / "ck", str(phantoms / "split.csv")
    r = CliRunner().invoke(app, ["train", str(phantoms), "--split-file", split,
                                 "--candidates", "test", "--image-size", "32", "--epochs", "2",
                                 "--batch-size", "8", *SCOPE, "--keep-candidates",
                                 "--out", str(out)])  # fmt: skip
    assert r.exit_code == 0, r.output
    assert "selection: synthetic-lesion AUROC" in r.output and "kept test" in r.output
    kept = load_checkpoint(out / "candidates" / "test")  # --keep-candidates: each one stays
    assert kept.checkpoint_hash == load_checkpoint(out).checkpoint_hash
    record = json.loads((out / "config.json").read_text())["training"]["selection"]
    assert [c["config"] for c in record["candidates"]] == ["test"]
    assert record["candidates"][0]["n_train"] == 24 and "highest" in record["why"]
    assert "never_read" not in r.output
    r = CliRunner().invoke(app, ["doctor", "--model", str(out)])
    assert r.exit_code == 0, r.output
    figure = f"{record['candidates'][0]['figure']['auroc']:.3f}"
    assert "selection of" in r.output and figure in r.output and "highest" in r.output


def test_train_with_too_few_normals_says_so_and_trains_the_default(tmp_path: Path) -> None:
    data = _phantoms(tmp_path / "few", n_train=6, n_val=0, size=32)
    (data / "split.csv").unlink()  # a plain folder: 6 files, too few to hold any out
    out = tmp_path / "ck"
    r = CliRunner().invoke(app, ["train", str(data), "--candidates", "test,lite0", "--image-size",
                                 "32", "--epochs", "1", *SCOPE, "--out", str(out)])  # fmt: skip
    assert r.exit_code == 0, r.output
    assert "no selection" in r.output and "trained the default test" in r.output.replace("\n", " ")
    record = json.loads((out / "config.json").read_text())["training"]["selection"]
    assert record["chosen"] == "test" and "6 normal images" in record["skipped"]
    assert json.loads((out / "config.json").read_text())["model_config"]["name"] == "test"


def _item(rel: str, group: str | None, split: str | None = None) -> ImageItem:
    return ImageItem(Path("/x") / rel, rel, 0, split, group)


def test_validation_normals_are_held_out_by_patient_never_by_slice() -> None:
    by_patient = [_item(f"p{p}/s{s}.png", f"P{p}") for p in range(8) for s in range(4)]
    h = holdout_items(by_patient)
    assert not isinstance(h, str) and "by patient" in h.how
    train_groups = {it.group for it in h.train}
    val_groups = {it.group for it in h.val}
    assert val_groups and train_groups and not train_groups & val_groups
    assert all(len([it for it in h.val if it.group == g]) == 4 for g in val_groups)
    by_file = holdout_items([_item(f"f{i}.png", None) for i in range(12)])
    assert not isinstance(by_file, str) and "by file" in by_file.how and len(by_file.val) >= 2
    too_few = holdout_items([_item(f"p{p}/s{s}.png", f"P{p}") for p in range(2) for s in range(8)])
    assert isinstance(too_few, str) and "2 patients" in too_few
    rows = [_item(f"t{i}.png", None, "train") for i in range(4)] + [_item("v.png", None, "val")]
    given = holdout_items(rows)
    assert not isinstance(given, str) and [it.rel for it in given.val] == ["v.png"]


def test_cli_candidates_match_the_documented_set() -> None:
    assert SELECTION_CANDIDATES == CANDIDATES
    assert CANDIDATES[:3] == ("lite0", "lite0-d", "rd4ad")
    assert get_config("lite0").map_sigma == 4.0 and get_config("rd4ad").arch == "rd4ad"


@pytest.fixture(scope="module")
def small_checkpoint(phantoms: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("ck") / "ck"
    r = CliRunner().invoke(app, ["train", str(phantoms), "--config", "test", "--image-size", "32",
                                 "--epochs", "2", "--batch-size", "8", *SCOPE,
                                 "--out", str(out)])  # fmt: skip
    assert r.exit_code == 0, r.output
    return out


def test_evaluate_synthetic_on_a_folder_of_normals(
    phantoms: Path, small_checkpoint: Path, tmp_path: Path
) -> None:
    r = CliRunner().invoke(app, ["evaluate", str(phantoms), "--split-file",
                                 str(phantoms / "split.csv"), "--synthetic", "--model",
                                 str(small_checkpoint), "--out", str(tmp_path / "ev")])  # fmt: skip
    assert r.exit_code == 0, r.output
    f = json.loads((tmp_path / "ev" / "synthetic.json").read_text())
    assert f["n_normal"] == 10 and f["n_lesioned"] == 50  # the val rows (the default split)
    assert f["ci95"][0] <= f["auroc"] <= f["ci95"][1] and len(f["per_family"]) == 5
    assert f"{f['auroc']:.3f}" in r.output and "95% interval" in r.output


def test_evaluate_synthetic_on_a_dicom_archive(small_checkpoint: Path, tmp_path: Path) -> None:
    from tests.dicom_factory import write_corrupt_dicom, write_ct_series

    write_ct_series(tmp_path / "arch" / "s1", n_slices=4, rows=40, cols=40, seed=1)
    write_ct_series(tmp_path / "arch" / "s2", n_slices=3, rows=40, cols=36, seed=2,
                    series_uid="1.2.3.4.5.6.7", study_uid="1.2.3.4.5.6")  # fmt: skip
    write_corrupt_dicom(tmp_path / "arch" / "bad.dcm")
    r = CliRunner().invoke(app, ["evaluate", str(tmp_path / "arch"), "--archive", "--synthetic",
                                 "--model", str(small_checkpoint), "--out",
                                 str(tmp_path / "ev")])  # fmt: skip
    assert r.exit_code == 0, r.output
    f = json.loads((tmp_path / "ev" / "synthetic.json").read_text())
    assert f["n_normal"] == 7 and f["n_lesioned"] == 35 and len(f["errors"]) == 1
    assert 0.0 <= f["auroc"] <= 1.0 and "bad.dcm" not in r.output


@pytest.mark.ray
@pytest.mark.slow
def test_candidates_train_as_ray_actors_on_a_cluster(
    phantoms: Path, tmp_path: Path, shared_ray
) -> None:
    ray = pytest.importorskip("ray")

    items = list_images(phantoms, phantoms / "split.csv", splits=("train", "val"))
    cfg = get_config("test", image_size=32)
    cands = [Candidate("a", cfg), Candidate("b", cfg, TrainConfig(epochs=1, batch_size=8))]
    seen: set[str] = set()
    address = ray.get_runtime_context().gcs_address
    sel = run_selection(items, tmp_path / "ck", cands, TrainConfig(epochs=2, batch_size=8),
                        address=address, progress=lambda n, p: seen.add(n))  # fmt: skip
    assert seen == {"a", "b"} and sel.result.model is None
    epochs = {r["config"]: r["epochs"] for r in sel.record["candidates"]}
    assert epochs == {"a": 2, "b": 1}
    assert load_checkpoint(tmp_path / "ck").meta["training"]["selection"]["chosen"] == sel.chosen


def _figure(normal: list[float], lesion: list[float], source: list[int]) -> dict:
    from pdd_batch.evaluation.synthetic import synthetic_figure

    f = synthetic_figure(normal, lesion, source)
    f["scores"] = {"normal": normal, "lesion": lesion, "source": source}
    return f


def test_another_candidate_replaces_the_default_only_when_clearly_better() -> None:
    from jobs.selection import choose

    rng = np.random.default_rng(0)
    normal = rng.random(12).tolist()
    source = [i for i in range(12) for _ in range(5)]
    weak = _figure(normal, rng.random(60).tolist(), source)  # chance
    strong = _figure(normal, (rng.random(60) + 1.0).tolist(), source)  # every copy above
    jitter = np.random.default_rng(104).normal(0, 0.15, 60)  # a little higher by chance
    nudged = _figure(normal, (np.array(weak["scores"]["lesion"]) + jitter).tolist(), source)
    assert choose([weak, strong])[:2] == (1, 1)  # clearly better: replaces the default
    best, keep, margin = choose([weak, nudged])
    assert nudged["auroc"] > weak["auroc"] and (best, keep) == (1, 0)  # higher, not clearly
    assert margin is not None and margin["ci95"][0] <= 0 <= margin["ci95"][1]
    assert choose([strong, weak])[:2] == (0, 0) and choose([strong, weak])[2] is None


def test_train_selects_on_an_archive_holding_out_whole_studies(tmp_path: Path) -> None:
    from tests.dicom_factory import write_ct_series

    for k, n in enumerate((4, 5, 6)):
        write_ct_series(tmp_path / "arch" / f"s{k}", n_slices=n, rows=40, cols=40, seed=k,
                        series_uid=f"1.2.3.9.{k}.1", study_uid=f"1.2.3.9.{k}")  # fmt: skip
    out = tmp_path / "ck"
    r = CliRunner().invoke(app, ["train", str(tmp_path / "arch"), "--archive", "--candidates",
                                 "test", "--image-size", "32", "--epochs", "1", "--batch-size",
                                 "4", "--out", str(out)])  # fmt: skip
    assert r.exit_code == 0, r.output
    record = json.loads((out / "config.json").read_text())["training"]["selection"]
    assert record["holdout"] == "1 of 3 studies held out (by study)"
    n_val = record["candidates"][0]["figure"]["n_normal"]
    assert n_val in (4, 5, 6) and record["candidates"][0]["n_train"] == 15 - n_val  # whole studies
