"""Synthetic DICOM and NIfTI files for tests, written with pydicom / nibabel (never our readers).

Pixel values are a known function of the slice position so tests can check sorting without
hard-coding outputs: the slice at position index ``k`` (0 = most inferior / first along the
slice normal) of time point ``t`` holds ``slice_values(k, rows, cols, t)`` in modality units
(HU for CT). Patient identifiers are fake but present, so privacy tests can look for them.

Main entry points:
    write_ct_series(directory, n_slices=..., shuffle_instances=..., gap_at=..., tilt_deg=...,
                    monochrome1=..., study_uid=..., patient_name=...) -> list[Path]
    write_multiframe(path, n_frames=..., ...) -> Path
    write_xray(path, ...) -> Path
    write_non_image(path, kind="SR" | "KO" | "PR" | "SEG" | "PDF") -> Path
    write_dicomdir(path) -> Path
    write_corrupt_dicom(path) / write_zero_byte(path) / write_text(path)
    write_nifti(path, shape=..., affine=..., dtype=..., ...) -> tuple[Path, np.ndarray]
    truncate_file(path, keep_fraction)
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from pathlib import Path

import nibabel as nib
import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import (
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    RLELossless,
    generate_uid,
)

CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"
MR_IMAGE = "1.2.840.10008.5.1.4.1.1.4"
ENHANCED_CT = "1.2.840.10008.5.1.4.1.1.2.1"
ENHANCED_MR = "1.2.840.10008.5.1.4.1.1.4.1"
CR_IMAGE = "1.2.840.10008.5.1.4.1.1.1"
DX_IMAGE = "1.2.840.10008.5.1.4.1.1.1.1"
US_IMAGE = "1.2.840.10008.5.1.4.1.1.6.1"
NON_IMAGE_SOP = {
    "SR": "1.2.840.10008.5.1.4.1.1.88.11",  # Basic Text SR
    "KO": "1.2.840.10008.5.1.4.1.1.88.59",  # Key Object Selection
    "PR": "1.2.840.10008.5.1.4.1.1.11.1",  # Grayscale Softcopy Presentation State
    "SEG": "1.2.840.10008.5.1.4.1.1.66.4",  # Segmentation
    "PDF": "1.2.840.10008.5.1.4.1.1.104.1",  # Encapsulated PDF
}
MEDIA_STORAGE_DIRECTORY = "1.2.840.10008.1.3.10"

ORIENTATIONS = {
    "axial": (1.0, 0.0, 0.0, 0.0, 1.0, 0.0),
    "coronal": (1.0, 0.0, 0.0, 0.0, 0.0, -1.0),
    "sagittal": (0.0, 1.0, 0.0, 0.0, 0.0, -1.0),
}
FAKE_PATIENT_NAME = "Testperson^Jane"
FAKE_PATIENT_ID = "PID-4711-SECRET"
FAKE_STUDY_DATE = "20240229"
CT_INTERCEPT = -1024.0
BITS_STORED = 12


def slice_values(k: int, rows: int, cols: int, t: int = 0) -> np.ndarray:
    """Modality values (HU for CT) of the slice at position index ``k``, time point ``t``.

    ``100 k + 1000 t + r + 2 c``: increasing along the normal, and asymmetric in-plane so that a
    flipped or transposed slice is detectable. Returns float32 (rows, cols).
    """
    r = np.arange(rows, dtype=np.float32)[:, None]
    c = np.arange(cols, dtype=np.float32)[None, :]
    return (100.0 * k + 1000.0 * t + r + 2.0 * c).astype(np.float32)


def _uid(seed: str | None) -> str:
    return generate_uid(entropy_srcs=[seed]) if seed is not None else generate_uid()


def _base_dataset(
    sop_class: str,
    modality: str,
    study_uid: str,
    series_uid: str,
    patient_name: str,
    patient_id: str,
    transfer_syntax: str = ExplicitVRLittleEndian,
) -> Dataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = transfer_syntax
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = modality
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.PatientName = patient_name
    ds.PatientID = patient_id
    ds.PatientBirthDate = "19700101"
    ds.StudyDate = FAKE_STUDY_DATE
    ds.AccessionNumber = "ACC-99887766"
    ds.SeriesNumber = 1
    return ds


def _set_pixels(ds: Dataset, stored: np.ndarray, transfer_syntax: str) -> None:
    """Attach uint16 pixels (frames, rows, cols) or (rows, cols); compress when asked."""
    stored = np.ascontiguousarray(stored.astype(np.uint16))
    ds.Rows, ds.Columns = int(stored.shape[-2]), int(stored.shape[-1])
    ds.SamplesPerPixel = 1
    ds.BitsAllocated = 16
    ds.BitsStored = BITS_STORED
    ds.HighBit = BITS_STORED - 1
    ds.PixelRepresentation = 0
    if stored.ndim == 3:
        ds.NumberOfFrames = int(stored.shape[0])
    if transfer_syntax in (ExplicitVRLittleEndian, ImplicitVRLittleEndian):
        ds.PixelData = stored.tobytes()
        ds.file_meta.TransferSyntaxUID = transfer_syntax
    elif transfer_syntax in (RLELossless, JPEG2000Lossless):
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.PixelData = stored.tobytes()
        ds.compress(transfer_syntax, stored, generate_instance_uid=False)
    else:
        raise ValueError(f"write: unsupported transfer syntax {transfer_syntax}")


def _to_stored(values: np.ndarray, modality: str, monochrome1: bool) -> np.ndarray:
    intercept = CT_INTERCEPT if modality == "CT" else 0.0
    stored = np.rint(values - intercept)
    if monochrome1 and modality != "CT":  # CT HU come from the modality LUT, never inverted
        stored = (2**BITS_STORED - 1) - stored
    if stored.min() < 0 or stored.max() >= 2**BITS_STORED:
        raise ValueError("write: synthetic values do not fit in 12 bits")
    return stored.astype(np.uint16)


def _geometry(
    orientation: str, tilt_deg: float
) -> tuple[tuple[float, ...], np.ndarray, np.ndarray]:
    """IOP, slice normal, and the direction the table moves (positions step along it)."""
    iop = np.array(ORIENTATIONS[orientation], dtype=float)
    step_dir = np.cross(iop[:3], iop[3:])
    if tilt_deg:
        if orientation != "axial":
            raise ValueError("write: tilt_deg only for axial series")
        t = np.deg2rad(tilt_deg)
        iop = np.array([1.0, 0.0, 0.0, 0.0, np.cos(t), np.sin(t)])
    normal = np.cross(iop[:3], iop[3:])
    return tuple(float(v) for v in iop), normal, step_dir


def write_ct_series(
    directory: Path,
    *,
    n_slices: int = 8,
    rows: int = 16,
    cols: int = 12,
    modality: str = "CT",
    orientation: str = "axial",
    slice_step: float = 2.5,
    pixel_spacing: tuple[float, float] = (0.7, 0.7),
    shuffle_instances: bool = False,
    gap_at: int | None = None,
    duplicate_at: int | None = None,
    add_scout: bool = False,
    tilt_deg: float = 0.0,
    time_points: int = 1,
    monochrome1: bool = False,
    transfer_syntax: str = ExplicitVRLittleEndian,
    study_uid: str | None = None,
    series_uid: str | None = None,
    patient_name: str = FAKE_PATIENT_NAME,
    patient_id: str = FAKE_PATIENT_ID,
    prefix: str = "IM",
    seed: int = 0,
    study_date: str = FAKE_STUDY_DATE,
) -> list[Path]:
    """Write one single-frame series (CT by default; ``modality="MR"`` for MR) into ``directory``.

    Args:
        n_slices: number of slice positions written (per time point).
        shuffle_instances: InstanceNumbers (and so file names) in random order vs position.
        gap_at: leave position index ``gap_at`` empty (positions then run 0..n_slices).
        duplicate_at: write one extra instance at the position of index ``duplicate_at``.
        add_scout: write one extra coronal localizer instance in the same series.
        tilt_deg: gantry tilt; IOP tilted about x, positions still step along z.
        time_points: >1 writes a 4D series (same positions repeated, TemporalPositionIdentifier).
        monochrome1: stored pixels inverted and PhotometricInterpretation MONOCHROME1.
        transfer_syntax: Explicit/Implicit VR LE, RLE Lossless or JPEG 2000 Lossless (J2K
            needs rows and cols >= 32).
        study_date: StudyDate (YYYYMMDD; "" for an empty, type-2 StudyDate).

    Returns:
        Paths of the main instances ordered by (time point, position index), then any extra
        duplicate and scout instances. Values: ``slice_values(k, rows, cols, t)``.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    study_uid = study_uid or _uid(f"study-{seed}")
    series_uid = series_uid or _uid(f"series-{seed}-{prefix}")
    iop, _, step_dir = _geometry(orientation, tilt_deg)
    ks = [k for k in range(n_slices + (1 if gap_at is not None else 0)) if k != gap_at]
    specs = [(t, k, iop) for t in range(time_points) for k in ks]
    if duplicate_at is not None:
        specs.append((0, duplicate_at, iop))
    if add_scout:
        specs.append((0, n_slices // 2, ORIENTATIONS["coronal"]))
    numbers = list(range(1, len(specs) + 1))
    if shuffle_instances:
        rng.shuffle(numbers)
    sop_class = CT_IMAGE if modality == "CT" else MR_IMAGE
    origin = np.array([-0.5 * cols * pixel_spacing[1], -0.5 * rows * pixel_spacing[0], -40.0])
    paths = []
    for (t, k, this_iop), number in zip(specs, numbers, strict=True):
        ds = _base_dataset(
            sop_class, modality, study_uid, series_uid, patient_name, patient_id, transfer_syntax
        )
        ds.InstanceNumber = number
        ds.StudyDate = study_date
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL" if this_iop == iop else "LOCALIZER"]
        ds.ImageOrientationPatient = list(this_iop)
        ds.ImagePositionPatient = [float(v) for v in origin + k * slice_step * step_dir]
        ds.PixelSpacing = list(pixel_spacing)
        ds.SliceThickness = slice_step
        if time_points > 1:
            ds.TemporalPositionIdentifier = t + 1
            ds.NumberOfTemporalPositions = time_points
        ds.PhotometricInterpretation = "MONOCHROME1" if monochrome1 else "MONOCHROME2"
        if modality == "CT":
            ds.RescaleSlope, ds.RescaleIntercept, ds.RescaleType = 1.0, CT_INTERCEPT, "HU"
        values = slice_values(k, rows, cols, t)
        _set_pixels(ds, _to_stored(values, modality, monochrome1), transfer_syntax)
        path = directory / f"{prefix}{number:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def _frame_group(position: Sequence[float], stack_pos: int) -> Dataset:
    item = Dataset()
    pos = Dataset()
    pos.ImagePositionPatient = [float(v) for v in position]
    item.PlanePositionSequence = DicomSequence([pos])
    content = Dataset()
    content.StackID = "1"
    content.InStackPositionNumber = stack_pos
    item.FrameContentSequence = DicomSequence([content])
    return item


def write_multiframe(
    path: Path,
    *,
    n_frames: int = 6,
    rows: int = 16,
    cols: int = 12,
    modality: str = "MR",
    orientation: str = "axial",
    slice_step: float = 3.0,
    pixel_spacing: tuple[float, float] = (1.5, 1.5),
    shuffle_frames: bool = False,
    transfer_syntax: str = ExplicitVRLittleEndian,
    study_uid: str | None = None,
    series_uid: str | None = None,
    patient_name: str = FAKE_PATIENT_NAME,
    seed: int = 0,
) -> Path:
    """Write an Enhanced MR/CT multi-frame object with per-frame plane positions.

    Frame ``i`` holds position index ``order[i]`` (``order`` is a permutation when
    ``shuffle_frames``), values ``slice_values(order[i], rows, cols)``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    study_uid = study_uid or _uid(f"study-{seed}")
    series_uid = series_uid or _uid(f"mf-series-{seed}")
    sop_class = ENHANCED_CT if modality == "CT" else ENHANCED_MR
    ds = _base_dataset(sop_class, modality, study_uid, series_uid, patient_name, FAKE_PATIENT_ID)
    ds.ImageType = ["ORIGINAL", "PRIMARY", "VOLUME", "NONE"]
    ds.InstanceNumber = 1
    iop, _, step_dir = _geometry(orientation, 0.0)
    order = list(range(n_frames))
    if shuffle_frames:
        random.Random(seed).shuffle(order)
    origin = np.array([-10.0, -12.0, -20.0])
    shared = Dataset()
    measures = Dataset()
    measures.PixelSpacing = list(pixel_spacing)
    measures.SliceThickness = slice_step
    shared.PixelMeasuresSequence = DicomSequence([measures])
    orient = Dataset()
    orient.ImageOrientationPatient = list(iop)
    shared.PlaneOrientationSequence = DicomSequence([orient])
    if modality == "CT":
        trans = Dataset()
        trans.RescaleSlope, trans.RescaleIntercept, trans.RescaleType = 1.0, CT_INTERCEPT, "HU"
        shared.PixelValueTransformationSequence = DicomSequence([trans])
    ds.SharedFunctionalGroupsSequence = DicomSequence([shared])
    ds.PerFrameFunctionalGroupsSequence = DicomSequence(
        [_frame_group(origin + k * slice_step * step_dir, k + 1) for k in order]
    )
    ds.PhotometricInterpretation = "MONOCHROME2"
    frames = np.stack([_to_stored(slice_values(k, rows, cols), modality, False) for k in order])
    _set_pixels(ds, frames, transfer_syntax)
    ds.save_as(path, enforce_file_format=True)
    return path


def write_xray(
    path: Path,
    *,
    rows: int = 40,
    cols: int = 30,
    modality: str = "DX",
    monochrome1: bool = False,
    study_uid: str | None = None,
    patient_name: str = FAKE_PATIENT_NAME,
    seed: int = 0,
) -> Path:
    """Write a single 2D projection radiograph (DX or CR) with values ``slice_values(0, ...)``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sop_class = DX_IMAGE if modality == "DX" else CR_IMAGE
    ds = _base_dataset(
        sop_class,
        modality,
        study_uid or _uid(f"study-{seed}"),
        _uid(f"xray-{seed}-{path.name}"),
        patient_name,
        FAKE_PATIENT_ID,
    )
    ds.InstanceNumber = 1
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    ds.PhotometricInterpretation = "MONOCHROME1" if monochrome1 else "MONOCHROME2"
    ds.ImagerPixelSpacing = [0.2, 0.2]
    _set_pixels(
        ds, _to_stored(slice_values(0, rows, cols), modality, monochrome1), ExplicitVRLittleEndian
    )
    ds.save_as(path, enforce_file_format=True)
    return path


def write_non_image(
    path: Path, *, kind: str = "SR", study_uid: str | None = None, seed: int = 0
) -> Path:
    """Write a non-image DICOM object (``kind`` in SR, KO, PR, SEG, PDF)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    ds = _base_dataset(
        NON_IMAGE_SOP[kind],
        "DOC" if kind == "PDF" else kind,
        study_uid or _uid(f"study-{seed}"),
        _uid(f"{kind}-{seed}-{path.name}"),
        FAKE_PATIENT_NAME,
        FAKE_PATIENT_ID,
    )
    ds.InstanceNumber = 1
    if kind == "SR":
        ds.ValueType = "CONTAINER"
        ds.ContinuityOfContent = "SEPARATE"
    elif kind == "PDF":
        ds.MIMETypeOfEncapsulatedDocument = "application/pdf"
        ds.EncapsulatedDocument = b"%PDF-1.4\n%%EOF\n"
    ds.save_as(path, enforce_file_format=True)
    return path


def write_dicomdir(path: Path) -> Path:
    """Write a DICOMDIR-like media directory object (Media Storage Directory SOP class)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = MEDIA_STORAGE_DIRECTORY
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.FileSetID = "TESTSET"
    record = Dataset()
    record.DirectoryRecordType = "PATIENT"
    record.PatientName = FAKE_PATIENT_NAME
    record.PatientID = FAKE_PATIENT_ID
    ds.DirectoryRecordSequence = DicomSequence([record])
    ds.save_as(path, enforce_file_format=True)
    return path


def write_corrupt_dicom(path: Path, *, seed: int = 0) -> Path:
    """A file with a valid DICOM preamble and 'DICM' magic followed by random bytes."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    junk = np.random.default_rng(seed).integers(0, 256, 600, dtype=np.uint8).tobytes()
    path.write_bytes(b"\0" * 128 + b"DICM" + b"\x02\x00\x10\x00UI\xff\xff" + junk)
    return path


def write_zero_byte(path: Path) -> Path:
    """An empty file (e.g. an interrupted copy)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"")
    return path


def write_text(path: Path, text: str = "Archive notes.\n") -> Path:
    """A non-DICOM text file (README, .json, .txt)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def truncate_file(path: Path, keep_fraction: float = 0.5) -> Path:
    """Cut a file to a fraction of its size (a truncated transfer)."""
    path = Path(path)
    raw = path.read_bytes()
    path.write_bytes(raw[: max(1, int(len(raw) * keep_fraction))])
    return path


def nifti_values(shape: Sequence[int]) -> np.ndarray:
    """Values for a NIfTI test volume (X, Y, Z[, T]): ``100 z + 1000 t + x + 2 y`` (float64)."""
    grids = np.meshgrid(*[np.arange(n, dtype=np.float64) for n in shape], indexing="ij")
    out = grids[0] + 2.0 * grids[1]
    if len(shape) >= 3:
        out = out + 100.0 * grids[2]
    if len(shape) == 4:
        out = out + 1000.0 * grids[3]
    return out


def write_nifti(
    path: Path,
    *,
    shape: Sequence[int] = (12, 10, 6),
    zooms: Sequence[float] = (1.5, 1.5, 3.0),
    affine: np.ndarray | None = None,
    dtype: type | str = np.int16,
    scale: tuple[float, float] | None = None,
    big_endian: bool = False,
    nifti2: bool = False,
) -> tuple[Path, np.ndarray]:
    """Write a NIfTI file (.nii or .nii.gz from the suffix) holding ``nifti_values(shape)``.

    Args:
        affine: voxel-to-RAS affine; default diag(zooms) (already RAS canonical). Pass a flipped
            one (e.g. negative x) for an LAS file.
        dtype: on-disk dtype (int16, uint8, float32, float64, ...).
        scale: (slope, intercept) written to the header; stored values are (v - inter) / slope.
        big_endian: write big-endian data and header.
        nifti2: write a NIfTI-2 file.

    Returns:
        The path and the float64 values the file represents (after scaling), shape ``shape``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    values = nifti_values(shape)
    if affine is None:
        affine = np.diag([*list(zooms[:3]), 1.0])
    dt = np.dtype(dtype)
    if big_endian:
        dt = dt.newbyteorder(">")
    stored = values if scale is None else (values - scale[1]) / scale[0]
    stored = stored.astype(dt)
    cls = nib.Nifti2Image if nifti2 else nib.Nifti1Image
    header = (nib.Nifti2Header if nifti2 else nib.Nifti1Header)(
        endianness=">" if big_endian else "<"
    )
    img = cls(stored, affine, header=header)
    img.header.set_data_dtype(dt)
    if scale is not None:
        img.header.set_slope_inter(scale[0], scale[1])
    else:
        img.header.set_slope_inter(1.0, 0.0)
    nib.save(img, path)
    return path, stored.astype(np.float64) * (scale[0] if scale else 1.0) + (
        scale[1] if scale else 0.0
    )
