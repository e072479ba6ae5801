"""Labelled image lists for training, calibration and evaluation (no torch).

Three layouts are understood:

* a folder with class sub-folders (``normal/``, ``abnormal/``, ...): label 0 for the normal names in
  ``NORMAL_CLASS_NAMES``, 1 for every other folder (e.g. MVTec-style defect types);
* a split CSV (``path,label,split``, optional ``patient_id``/``mask``), given with ``split_file``
  or as DATA itself; paths resolve against the CSV's folder, DATA and DATA's parent (first match);
* an index CSV with ``patient_id`` and no ``split``: ``patient_split`` assigns splits by patient.

Every path given to the rest of the program is absolute; ``ImageItem.rel`` is the short path used in
reports and error records.
"""

from __future__ import annotations

import csv
import hashlib
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from PIL import Image

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
NORMAL_CLASS_NAMES = frozenset({"normal", "good", "healthy", "0", "negative", "ok"})
SPLITS = ("train", "val", "test")


class DatasetError(ValueError):
    """A dataset folder or split file that cannot be used; the message names the file or column."""


@dataclass(frozen=True)
class ImageItem:
    """One labelled image.

    Attributes:
        path: absolute path of the image file.
        rel: path relative to the dataset root (reports, error records).
        label: 0 normal, 1 anomalous.
        split: "train", "val", "test", "excluded" or None when the layout has no split.
        group: patient (or other grouping) id used to keep related images on one side of a split.
        mask: absolute path of a ground-truth mask (non-zero = anomalous pixel), if any.
    """

    path: Path
    rel: str
    label: int
    split: str | None = None
    group: str | None = None
    mask: Path | None = None


def label_from_name(name: str) -> int:
    """Map a class folder name or CSV label to 0 (normal) or 1 (anomalous)."""
    return 0 if str(name).strip().lower() in NORMAL_CLASS_NAMES else 1


def list_images(
    data: Path,
    split_file: Path | None = None,
    split: str | None = None,
    *,
    splits: Sequence[str] | None = None,
) -> list[ImageItem]:
    """List the labelled images of DATA, optionally restricted to one split (or several).

    Rows of a split file outside the splits asked for are skipped before their path is even
    resolved: ``train`` never looks at a ``test`` file.

    Args:
        data: a folder with class sub-folders, or a split/index CSV file.
        split_file: a CSV with ``path,label[,split][,patient_id][,mask]`` columns.
        split: keep only items of this split (needs a split column or file).
        splits: keep only items of these splits (instead of ``split``).

    Raises:
        DatasetError: missing folders/files/columns, unknown split, or no images found.
    """
    data = Path(data)
    if split_file is None and data.is_file() and data.suffix.lower() == ".csv":
        data, split_file = data.parent, data
    if not data.exists():
        raise DatasetError(f"dataset not found: {data}")
    wanted = tuple(splits) if splits is not None else (split,) if split is not None else None
    for name in wanted or ():
        if name not in SPLITS:
            raise DatasetError(f"split must be one of {SPLITS}, got {name!r}")
    if split_file is not None:
        items = read_split_csv(Path(split_file), data, keep_splits=wanted)
    else:
        items = _scan_class_folders(data)
    if wanted is not None:
        if all(it.split is None for it in items):
            raise DatasetError(
                f"split {'/'.join(wanted)!r} asked for, but {data} has no split column; "
                "pass --split-file"
            )
        items = [it for it in items if it.split in wanted]
    if not items:
        raise DatasetError(
            f"no images found in {data}" + (f" for split {'/'.join(wanted)!r}" if wanted else "")
        )
    return items


def _scan_class_folders(root: Path) -> list[ImageItem]:
    if not root.is_dir():
        raise DatasetError(f"{root} is neither a folder nor a .csv split file")
    items: list[ImageItem] = []
    for sub in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        label = label_from_name(sub.name)
        for f in sorted(sub.rglob("*")):
            if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES:
                items.append(ImageItem(f.resolve(), f.relative_to(root).as_posix(), label))
    if not items:
        raise DatasetError(
            f"{root}: no images in class sub-folders (expected e.g. normal/ and abnormal/ "
            f"holding {', '.join(IMAGE_SUFFIXES)} files)"
        )
    return items


def _resolve(rel: str, bases: Sequence[Path]) -> Path | None:
    for base in bases:
        cand = (base / rel).resolve()
        if cand.exists():
            return cand
    return None


def read_split_csv(
    csv_path: Path, data: Path, keep_splits: Sequence[str] | None = None
) -> list[ImageItem]:
    """Read a split/index CSV; image paths resolve against its folder, DATA, then DATA's parent.

    With ``keep_splits``, rows of another split are skipped unread (their files need not exist).

    Raises:
        DatasetError: the file or a required column is missing, a label is empty, or an image
            listed in it exists under none of the base folders.
    """
    if not csv_path.is_file():
        raise DatasetError(f"split file not found: {csv_path}")
    with csv_path.open(newline="") as fh:
        rows = list(csv.DictReader(fh, skipinitialspace=True))
    cols = {c.strip() for c in (rows[0].keys() if rows else [])}
    for col in ("path", "label"):
        if col not in cols:
            raise DatasetError(f"{csv_path.name}: missing column {col!r} (found {sorted(cols)})")
    data = data if data.is_dir() else data.parent
    bases = list(dict.fromkeys([csv_path.parent.resolve(), data.resolve(), data.parent.resolve()]))
    items = []
    for i, row in enumerate(rows, start=2):
        row = {k.strip(): (v or "").strip() for k, v in row.items() if k}
        if keep_splits is not None and row.get("split") and row["split"] not in keep_splits:
            continue
        path = _resolve(row["path"], bases)
        if path is None:
            raise DatasetError(
                f"{csv_path.name} line {i}: image {row['path']!r} not found under any of "
                f"{[str(b) for b in bases]}"
            )
        if row["label"] == "":
            raise DatasetError(f"{csv_path.name} line {i}: empty label")
        split = row.get("split") or None
        if split is not None and split not in (*SPLITS, "excluded"):
            raise DatasetError(f"{csv_path.name} line {i}: unknown split {split!r}")
        mask = _resolve(row["mask"], bases) if row.get("mask") else None
        rel = row["path"]
        items.append(
            ImageItem(path, rel, label_from_name(row["label"]), split, row.get("patient_id"), mask)
        )
    return items


def _unit_hash(key: str, seed: int) -> float:
    digest = hashlib.sha256(f"{seed}:{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def patient_split(
    items: Iterable[ImageItem],
    *,
    val_fraction: float = 0.1,
    test_fraction: float = 0.3,
    seed: int = 0,
) -> list[ImageItem]:
    """Assign train/val/test by patient (``group``) with a stable hash, normals only in train/val.

    Every patient lands wholly on one side. Normal images follow their patient's split. Anomalous
    images go to ``test`` when their patient is a test patient (or has no normal images at all) and
    are marked ``excluded`` when the patient's normals are used for training or validation, so no
    patient contributes to both sides.

    Raises:
        DatasetError: an item without a group, or fractions outside [0, 1).
    """
    if not (0 <= val_fraction < 1 and 0 < test_fraction < 1 and val_fraction + test_fraction < 1):
        raise DatasetError("val_fraction/test_fraction must be in [0, 1) and sum below 1")
    items = list(items)
    normal_groups = {it.group for it in items if it.label == 0}
    out = []
    for it in items:
        if it.group is None:
            raise DatasetError(f"{it.rel}: no patient_id; patient_split needs one for every row")
        u = _unit_hash(it.group, seed)
        side = (
            "test" if u < test_fraction else "val" if u < test_fraction + val_fraction else "train"
        )
        if it.label == 1 and side != "test":
            side = "test" if it.group not in normal_groups else "excluded"
        out.append(replace(it, split=side))
    return out


def write_split_csv(items: Sequence[ImageItem], out: Path) -> Path:
    """Write ``path,label,split,patient_id`` rows (paths as in ``rel``); returns ``out``."""
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["path", "label", "split", "patient_id"])
        for it in items:
            w.writerow([it.rel, it.label, it.split or "", it.group or ""])
    return out


def image_size_of(path: Path) -> tuple[int, int]:
    """(height, width) of an image file read from its header only."""
    with Image.open(path) as im:
        w, h = im.size
    return h, w


def describe(items: Sequence[ImageItem]) -> dict[str, int]:
    """Counts per split and label, e.g. ``{"train/normal": 60, "test/anomalous": 100}``."""
    counts: dict[str, int] = {}
    for it in items:
        key = f"{it.split or 'all'}/{'normal' if it.label == 0 else 'anomalous'}"
        counts[key] = counts.get(key, 0) + 1
    return dict(sorted(counts.items()))
