"""The bundled sample archive: built from files shipped inside installed packages, plus generated
series, so ``pdd-batch screen --sample`` runs on a fresh machine with no download.

Contents (deterministic: the same bytes on every build, so reruns are incremental):

* ``pydicom/``: pydicom's own test files: a CT slice, a JPEG 2000 MR slice, an enhanced
  multi-frame MR (10 frames), a structured report (a non-image object, reported as skipped) and
  a real chest radiograph (``RG1_J2KI.dcm`` of the pydicom-data package: CR, CHEST, PA,
  1955 x 1841, JPEG 2000), which the default set routes to its chest X-ray model. That model's
  scope is children aged 1-5 (its training set), so the sample's copy is relabelled as a child's
  (PatientAge ``004Y``, birth date removed); the film itself is an adult's, which is why the
  model's in-distribution check calls it out of distribution;
* ``nibabel/``: nibabel's test volumes: a 3D anatomical image and a small 4D NIfTI-2 series;
* ``generated/``: two synthetic head-CT studies written with pydicom (one with a bright lesion);
* ``broken/``: a corrupt DICOM file and a text file (reported in ``errors``, never dropped).
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

import numpy as np
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

log = logging.getLogger(__name__)

PYDICOM_FILES = (
    "CT_small.dcm",
    "MR_small_jp2klossless.dcm",
    "emri_small.dcm",
    "test-SR.dcm",
    "RG1_J2KI.dcm",  # CR chest PA (pydicom-data), for the default set's chest model
)
CHEST_FILE = "RG1_J2KI.dcm"
CHEST_SAMPLE_AGE = "004Y"  # inside the chest default's scope (age 1-5), see the module docstring
NIBABEL_FILES = ("anatomical.nii", "example_nifti2.nii.gz")
UID_PREFIX = "1.2.826.0.1.3680043.8.498."  # pydicom's documented example root


class SampleError(RuntimeError):
    """A file the sample archive needs is not installed."""


SAMPLE_MTIME_NS = 1_767_225_600 * 10**9  # 2026-01-01T00:00:00Z, the same on every rebuild


def _nibabel_data_dir() -> Path:
    import nibabel

    return Path(nibabel.__file__).parent / "tests" / "data"


def _copy_package_files(dest: Path) -> list[Path]:
    out = []
    (dest / "pydicom").mkdir(parents=True, exist_ok=True)
    for name in PYDICOM_FILES:
        src = get_testdata_file(name, download=False)
        if src is None:
            raise SampleError(f"pydicom test file {name} is not installed")
        out.append(Path(shutil.copy2(src, dest / "pydicom" / name)))
        if name == CHEST_FILE:
            _relabel_as_child(out[-1])
    (dest / "nibabel").mkdir(parents=True, exist_ok=True)
    for name in NIBABEL_FILES:
        src = _nibabel_data_dir() / name
        if not src.is_file():
            raise SampleError(f"nibabel test file {name} is not installed")
        out.append(Path(shutil.copy2(src, dest / "nibabel" / name)))
    return out


def _relabel_as_child(path: Path) -> None:
    """Give the copied chest radiograph a child's age (pixel data untouched)."""
    ds = dcmread(path)
    ds.PatientAge = CHEST_SAMPLE_AGE
    if "PatientBirthDate" in ds:
        del ds.PatientBirthDate
    ds.save_as(path, enforce_file_format=True)


def synthetic_head_ct(n_slices: int, size: int, *, lesion: bool, seed: int) -> np.ndarray:
    """A head-like CT volume in HU, int16 (Z, H, W): air, skull ring, brain, optional bleed."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    c = (size - 1) / 2.0
    r = np.hypot((yy - c) / (0.42 * size), (xx - c) / (0.36 * size))
    vol = np.full((n_slices, size, size), -1000.0, dtype=np.float32)
    for z in range(n_slices):
        shrink = 1.0 + 0.25 * abs(z - n_slices / 2) / n_slices
        rz = r * shrink
        vol[z][rz < 1.0] = 900.0  # bone
        vol[z][rz < 0.88] = 35.0  # brain
        if lesion and abs(z - n_slices // 2) <= 1:
            blob = np.hypot(yy - c * 0.8, xx - c * 1.2) < size * 0.08
            vol[z][blob] = 75.0  # acute blood
    vol += rng.normal(0.0, 4.0, size=vol.shape).astype(np.float32)
    return np.rint(vol).astype(np.int16)


def _ct_slice(vol: np.ndarray, z: int, study: str, series: str, tag: str) -> Dataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid(UID_PREFIX, [tag, "sop", str(z)])
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
    ds.Modality, ds.PatientName, ds.PatientID = "CT", "Sample^Synthetic", "SAMPLE-" + tag
    ds.InstanceNumber, ds.SeriesNumber = z + 1, 1
    ds.BodyPartExamined = "HEAD"  # what routing matches against a model's scope
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.ImagePositionPatient = [0.0, 0.0, float(z) * 5.0]
    ds.PixelSpacing, ds.SliceThickness = [0.8, 0.8], 5.0
    ds.RescaleSlope, ds.RescaleIntercept = 1, -1024
    ds.Rows, ds.Columns = vol.shape[1:]
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
    ds.PixelData = (vol[z].astype(np.int32) + 1024).astype(np.int16).tobytes()
    return ds


def write_synthetic_ct_study(
    folder: Path, tag: str, *, lesion: bool, n_slices: int = 12, size: int = 64
) -> list[Path]:
    """Write one synthetic CT study/series (one file per slice) with deterministic UIDs."""
    folder.mkdir(parents=True, exist_ok=True)
    study = generate_uid(UID_PREFIX, [tag, "study"])
    series = generate_uid(UID_PREFIX, [tag, "series"])
    vol = synthetic_head_ct(n_slices, size, lesion=lesion, seed=len(tag))
    paths = []
    for z in range(n_slices):
        ds = _ct_slice(vol, z, study, series, tag)
        path = folder / f"slice_{z:03d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def _write_broken(dest: Path) -> list[Path]:
    folder = dest / "broken"
    folder.mkdir(parents=True, exist_ok=True)
    corrupt = folder / "corrupt.dcm"
    corrupt.write_bytes(b"\0" * 128 + b"DICM" + b"\x02\x00\x10\x00UI\xff\xffnot really dicom")
    notes = folder / "notes.txt"
    notes.write_text("not an image\n", encoding="utf-8")
    return [corrupt, notes]


def build_sample_archive(dest: Path) -> Path:
    """Build the sample archive under ``dest`` (created, or replaced if it exists); returns it."""
    dest = Path(dest)
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    files = _copy_package_files(dest)
    files += write_synthetic_ct_study(dest / "generated" / "ct_normal", "normal", lesion=False)
    files += write_synthetic_ct_study(dest / "generated" / "ct_lesion", "lesion", lesion=True)
    files += _write_broken(dest)
    for path in files:  # deterministic content, deterministic times: reruns stay incremental
        os.utime(path, ns=(SAMPLE_MTIME_NS, SAMPLE_MTIME_NS))
    log.info("sample archive: %d files", len(files))
    return dest
