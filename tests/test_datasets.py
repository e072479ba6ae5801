"""Dataset listing: class folders, split CSVs with tolerant path bases, patient-level splits."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pdd_batch.evaluation.datasets import (
    DatasetError,
    ImageItem,
    describe,
    image_size_of,
    list_images,
    patient_split,
    read_split_csv,
    write_split_csv,
)
from tests.conftest import shared_path


def _png(path: Path, h: int = 20, w: int = 30) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (h, w), dtype=np.uint8)).save(path)


def test_class_folders_label_normal_and_others(tmp_path: Path) -> None:
    for rel in ("normal/a.png", "normal/b.png", "hemorrhage/c.png", "good/d.jpg", "notes/x.txt"):
        if rel.endswith(".txt"):
            (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
            (tmp_path / rel).write_text("not an image")
        else:
            _png(tmp_path / rel)
    items = list_images(tmp_path)
    got = {it.rel: it.label for it in items}
    assert got == {"normal/a.png": 0, "normal/b.png": 0, "hemorrhage/c.png": 1, "good/d.jpg": 0}
    assert all(it.path.is_absolute() and it.split is None for it in items)
    with pytest.raises(DatasetError, match="split"):
        list_images(tmp_path, split="train")


def test_split_csv_resolves_against_data_or_its_parent(tmp_path: Path) -> None:
    data = tmp_path / "ds"
    _png(data / "normal/1.png")
    _png(data / "abnormal/2.png")
    rows = "path,label,split\nnormal/1.png,0,train\nabnormal/2.png,1,test\n"
    # CSV outside DATA, paths relative to DATA.
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere/split.csv").write_text(rows)
    items = list_images(data, tmp_path / "elsewhere/split.csv", split="train")
    assert [it.rel for it in items] == ["normal/1.png"] and items[0].label == 0
    # Paths relative to DATA's parent.
    rows2 = "path,label,split\nds/normal/1.png,0,train\nds/abnormal/2.png,1,test\n"
    (tmp_path / "split2.csv").write_text(rows2)
    test = list_images(data, tmp_path / "split2.csv", split="test")
    assert [it.label for it in test] == [1] and test[0].path == (data / "abnormal/2.png").resolve()
    # DATA given as the CSV itself.
    (data / "split.csv").write_text(rows)
    assert len(list_images(data / "split.csv")) == 2


def test_split_csv_errors_name_the_problem(tmp_path: Path) -> None:
    _png(tmp_path / "normal/1.png")
    (tmp_path / "bad.csv").write_text("path,split\nnormal/1.png,train\n")
    with pytest.raises(DatasetError, match="label"):
        read_split_csv(tmp_path / "bad.csv", tmp_path)
    (tmp_path / "missing.csv").write_text("path,label,split\nnormal/404.png,0,train\n")
    with pytest.raises(DatasetError, match="404.png"):
        read_split_csv(tmp_path / "missing.csv", tmp_path)
    (tmp_path / "split.csv").write_text("path,label,split\nnormal/1.png,0,holdout\n")
    with pytest.raises(DatasetError, match="holdout"):
        read_split_csv(tmp_path / "split.csv", tmp_path)


def _items(groups: dict[str, tuple[int, int]]) -> list[ImageItem]:
    out = []
    for g, (n_norm, n_abn) in groups.items():
        out += [ImageItem(Path(f"/x/{g}_n{i}.png"), f"{g}_n{i}", 0, None, g) for i in range(n_norm)]
        out += [ImageItem(Path(f"/x/{g}_a{i}.png"), f"{g}_a{i}", 1, None, g) for i in range(n_abn)]
    return out


def test_patient_split_keeps_each_patient_on_one_side() -> None:
    groups = {f"p{i}": (2, 1 if i % 3 == 0 else 0) for i in range(200)}
    groups.update({f"q{i}": (0, 2) for i in range(50)})  # pneumonia-only patients
    split = patient_split(_items(groups), val_fraction=0.1, test_fraction=0.3, seed=1)
    sides: dict[str, set[str]] = {}
    for it in split:
        if it.split != "excluded":
            sides.setdefault(it.group, set()).add(it.split)
    assert all(len(s) == 1 for s in sides.values())
    assert all(it.split == "test" for it in split if it.group.startswith("q"))
    assert not [it for it in split if it.label == 1 and it.split in ("train", "val")]
    counts = describe(split)
    assert 0.2 < counts["test/normal"] / 400 < 0.4 and counts["train/normal"] > counts["val/normal"]
    again = patient_split(_items(groups), val_fraction=0.1, test_fraction=0.3, seed=1)
    assert [it.split for it in again] == [it.split for it in split]
    other = patient_split(_items(groups), val_fraction=0.1, test_fraction=0.3, seed=2)
    assert [it.split for it in other] != [it.split for it in split]


def test_write_split_csv_round_trip(tmp_path: Path) -> None:
    _png(tmp_path / "normal/a.png")
    _png(tmp_path / "abnormal/b.png", 40, 10)
    items = patient_split(
        [ImageItem(p.path, p.rel, p.label, None, p.rel[:1]) for p in list_images(tmp_path)],
        test_fraction=0.5,
    )
    back = list_images(tmp_path, write_split_csv(items, tmp_path / "s.csv"))
    assert [(b.rel, b.label, b.split, b.group) for b in back] == [
        (a.rel, a.label, a.split, a.group) for a in items
    ]
    assert image_size_of(tmp_path / "abnormal/b.png") == (40, 10)


@pytest.mark.realdata
def test_headct_split_counts() -> None:
    root = shared_path("data", "headct")
    counts = describe(list_images(root, root / "split.csv"))
    assert counts == {
        "test/anomalous": 100,
        "test/normal": 30,
        "train/normal": 60,
        "val/normal": 10,
    }


@pytest.mark.realdata
def test_chest_patient_split_has_no_patient_on_both_sides() -> None:
    index = shared_path("data", "chestxray", "index.csv")
    split = patient_split(list_images(index), seed=0)
    train = {it.group for it in split if it.split in ("train", "val")}
    test = {it.group for it in split if it.split == "test"}
    assert not train & test
    assert describe(split)["test/anomalous"] == 800
