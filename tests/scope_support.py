"""A mixed archive for routing tests: CT head, CT chest, MR brain, CR chest, NIfTI with and
without a sidecar; and the two scopes a head-CT and a chest-radiograph model would record."""

from __future__ import annotations

import json
from pathlib import Path

import pydicom
from dicom_factory import write_ct_series, write_nifti, write_xray

from pdd_batch.ingest.scope import ModelScope, parse_scope

HEAD_CT = parse_scope("modality=CT,body_part=HEAD,orientation=axial", domain="CT HU")
CHEST_XR = parse_scope("modality=CR/DX,body_part=CHEST,orientation=PA/AP", domain="percentile")
EXPECTED = {  # folder -> (model index or None, out-of-scope facts)
    "ct_head": (0, ""),
    "nifti_ct": (0, ""),
    "cr_chest": (1, ""),
    "ct_chest": (None, "(CT, CHEST)"),
    "mr_brain": (None, "(MR, BRAIN)"),
    "nifti_plain": (None, "(OT)"),
}


def tag(paths: list[Path], **attrs: str) -> None:
    """Set DICOM attributes (e.g. BodyPartExamined) on written files."""
    for path in paths:
        ds = pydicom.dcmread(path)
        for key, value in attrs.items():
            setattr(ds, key, value)
        ds.save_as(path, enforce_file_format=True)


def make_mixed_archive(root: Path, slices: int = 4) -> Path:
    """One series per ``EXPECTED`` folder (each its own study)."""
    head = write_ct_series(root / "ct_head", n_slices=slices, rows=32, cols=32, seed=1)
    tag(head, BodyPartExamined="HEAD")
    chest = write_ct_series(root / "ct_chest", n_slices=slices, rows=32, cols=32, seed=2)
    tag(chest, StudyDescription="CT THORAX W CONTRAST")  # no BodyPartExamined: from the words
    mr = write_ct_series(
        root / "mr_brain", n_slices=slices, rows=32, cols=32, modality="MR", seed=3
    )
    tag(mr, BodyPartExamined="BRAIN")
    cr = write_xray(root / "cr_chest" / "cr.dcm", rows=48, cols=40, modality="CR", seed=4)
    tag([cr], BodyPartExamined="CHEST", ViewPosition="PA")
    write_nifti(root / "nifti_ct" / "head.nii.gz", shape=(20, 16, 6))
    sidecar = {"Modality": "CT", "BodyPartExamined": "HEAD"}
    (root / "nifti_ct" / "head.json").write_text(json.dumps(sidecar), encoding="utf-8")
    write_nifti(root / "nifti_plain" / "vol.nii.gz", shape=(20, 16, 6))
    return root


def folder_of(files: tuple[str, ...] | list[str]) -> str:
    return str(files[0]).split("/")[0]


def scopes() -> list[ModelScope]:
    return [HEAD_CT, CHEST_XR]
