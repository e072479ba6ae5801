"""A DICOM Secondary Capture series of heatmap overlays, attached to the exported study.

Each overlay becomes one single-frame RGB Secondary Capture Image (PS3.3 A.8.1) in a new
series of the (de-identified) study, so a PACS viewer shows the overlays beside the images. Each
carries a complete file meta group (group length included) and, when its source image is known
(``ScSource``), a SourceImageSequence to it and the source's InstanceNumber in its comment.
"""

from __future__ import annotations

import datetime as dt
import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, ExplicitVRLittleEndian

SC_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.7"
SERIES_DESCRIPTION = "PDD anomaly heatmap overlays (not for diagnosis)"


@dataclass(frozen=True)
class ScStudy:
    """Study-level values the Secondary Capture series inherits (already de-identified).

    Attributes:
        study_uid: StudyInstanceUID of the exported study.
        patient_id: PatientID (pseudonym when de-identified).
        patient_name: PatientName (pseudonym when de-identified).
        study_date: StudyDate (shifted when de-identified), may be ''.
        deidentified: whether to mark the instances PatientIdentityRemoved=YES.
        burned_in: BurnedInAnnotation of the overlays, inherited from the source pixels they
            blend (``burned_in.inherited_flag``): "YES", "NO", or None to leave the attribute
            out when the sources do not say (never NO when unknown).
    """

    study_uid: str
    patient_id: str
    patient_name: str
    study_date: str = ""
    deidentified: bool = True
    burned_in: str | None = None


@dataclass(frozen=True)
class ScSource:
    """The source image an overlay is derived from (SOP Class and Instance UIDs, in memory)."""

    sop_class_uid: str
    sop_instance_uid: str


def derived_uid(*parts: str) -> str:
    """A deterministic ``2.25.<int>`` UID from text parts (SHA-256, 128 bits)."""
    digest = hashlib.sha256("\x1f".join(parts).encode()).digest()[:16]
    return f"2.25.{int.from_bytes(digest, 'big')}"


def sc_dataset(
    rgb: np.ndarray,
    study: ScStudy,
    series_uid: str,
    number: int,
    comment: str,
    source: ScSource | None = None,
    series_description: str = SERIES_DESCRIPTION,
):
    """One Secondary Capture dataset holding an RGB overlay.

    Args:
        rgb: uint8 (H, W, 3) overlay.
        study: the study it belongs to.
        series_uid: the overlay series UID.
        number: InstanceNumber (1-based).
        comment: ImageComments text (slice position and score; no identifiers).
        source: the image the overlay derives from (SourceImageSequence), when known.
        series_description: SeriesDescription (at most 64 characters).
    """
    if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"overlay must be uint8 (H, W, 3), got {rgb.dtype} {rgb.shape}")
    sop_uid = derived_uid(series_uid, str(number))
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = SC_IMAGE_STORAGE, sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    meta.FileMetaInformationVersion = b"\x00\x01"
    meta.FileMetaInformationGroupLength = 0  # recomputed whenever the dataset is written
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = SC_IMAGE_STORAGE, sop_uid
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study.study_uid, series_uid
    ds.PatientName, ds.PatientID = study.patient_name, study.patient_id
    ds.PatientBirthDate = ds.PatientSex = ds.ReferringPhysicianName = ""
    ds.StudyDate, ds.StudyTime, ds.AccessionNumber, ds.StudyID = study.study_date, "", "", ""
    ds.ContentDate = dt.date.today().strftime("%Y%m%d") if not study.deidentified else ""
    ds.Modality, ds.ConversionType = "OT", "WSD"
    ds.SeriesNumber, ds.InstanceNumber = 9901, number
    ds.SeriesDescription = series_description[:64]
    ds.Laterality = ds.PatientOrientation = ""  # type 2C: unknown for a derived overlay
    ds.ImageType = ["DERIVED", "SECONDARY"]
    ds.DerivationDescription = "PDD anomaly map blended over the model-input slice"
    ds.ImageComments = comment
    if source is not None:
        ref = Dataset()
        ref.ReferencedSOPClassUID = source.sop_class_uid
        ref.ReferencedSOPInstanceUID = source.sop_instance_uid
        ds.SourceImageSequence = [ref]
    if study.burned_in is not None:
        if study.burned_in not in ("YES", "NO"):
            raise ValueError(f"burned_in must be YES, NO or None, got {study.burned_in!r}")
        ds.BurnedInAnnotation = study.burned_in
    if study.deidentified:
        ds.PatientIdentityRemoved = "YES"
        ds.DeidentificationMethod = "pdd-batch export (derived from de-identified data)"
    ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PlanarConfiguration = 3, "RGB", 0
    ds.Rows, ds.Columns = rgb.shape[:2]
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.PixelData = np.ascontiguousarray(rgb).tobytes()
    return ds


def write_sc_series(
    overlays: list[tuple[np.ndarray, str]], study: ScStudy, out_dir: Path, series_seed: str
) -> list[Path]:
    """Write one SC instance per ``(rgb, comment)`` into ``out_dir``; returns the files."""
    out_dir.mkdir(parents=True, exist_ok=True)
    series_uid = derived_uid("pdd-overlays", study.study_uid, series_seed)
    paths = []
    for i, (rgb, comment) in enumerate(overlays, start=1):
        path = out_dir / f"SC{i:04d}.dcm"
        sc_dataset(rgb, study, series_uid, i, comment).save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths
