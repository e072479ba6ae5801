"""Synthetic screening run folders for the review-workflow tests (export, report, summary).

Writes identifiable DICOM series (names, IDs, dates, UIDs, nested sequences, private tags) and a
NIfTI volume with pydicom/nibabel into an archive folder, then the Parquet outputs of a run over
them using the ``pdd_batch.runs.schema`` contracts directly, with heatmaps that have a hot spot at a
known place. Used until ``pdd-batch screen`` can produce the same folder end to end.

``schema_version="1.0"`` (the default) writes a run as 1.0 wrote it: unkeyed SHA-256 keys, files
named by relative path (``source_file``/``file``) and the archive root in the manifest.
``schema_version=SCHEMA_VERSION`` writes the current layout: keys made with the test's site key
(``pdd_batch.keys``), ``file_key`` columns and no path anywhere; readers then need a
``SourceLocator`` (``SyntheticRun.locator()``).
"""

from __future__ import annotations

import hashlib
import io
import json
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from pdd_batch.ingest import keys
from pdd_batch.ingest.preprocess import PreprocessSpec
from pdd_batch.runs.schema import LEGACY_TABLES, LEGACY_VERSION, SCHEMA_VERSION, TABLES

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
IMAGE_SIZE = 64
RUN_ID = "run-test-0001"
MODEL_ID = "pdd-test"
CKPT_HASH = "c0ffee" * 10


@dataclass(frozen=True)
class Identity:
    """The identifying values of one synthetic patient/study (what must never leak)."""

    name: str = "Doe^Janet^Q"
    patient_id: str = "PID98765432"
    birth_date: str = "19480317"
    accession: str = "ACC55501234"
    institution: str = "Saint Examplar Hospital"
    physician: str = "Strangelove^Merkin"
    study_date: str = "20210405"
    address: str = "42 Wallaby Way Sydney"
    private_text: str = "PRIVATE-PHI-TOKEN-771"
    study_uid: str = field(default_factory=generate_uid)

    def strings(self) -> list[str]:
        """Every identifying string, for byte scans of exported files."""
        first, last = self.name.split("^")[1], self.name.split("^")[0]
        return [
            self.name,
            first,
            last,
            self.patient_id,
            self.birth_date,
            self.accession,
            self.institution,
            self.physician.split("^")[0],
            self.study_date,
            self.address,
            self.private_text,
            self.study_uid,
        ]


def _key(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _nested(ident: Identity, ref_uid: str) -> Dataset:
    """An item for a nested sequence (identifiers two levels deep)."""
    inner = Dataset()
    inner.PatientID = ident.patient_id
    inner.IssuerOfPatientID = ident.institution
    item = Dataset()
    item.ReferencedSOPClassUID = CT_IMAGE_STORAGE
    item.ReferencedSOPInstanceUID = ref_uid
    item.OtherPatientIDsSequence = Sequence([inner])
    return item


def write_ct_slice(
    path: Path,
    ident: Identity,
    series_uid: str,
    index: int,
    pixels: np.ndarray,
    frame_uid: str,
    ref_uid: str | None = None,
) -> str:
    """Write one CT slice full of identifiers (``ref_uid``: an instance it references)."""
    sop_uid = generate_uid()
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CT_IMAGE_STORAGE
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = CT_IMAGE_STORAGE, sop_uid
    ds.StudyInstanceUID, ds.SeriesInstanceUID = ident.study_uid, series_uid
    ds.FrameOfReferenceUID = frame_uid
    ds.PatientName, ds.PatientID = ident.name, ident.patient_id
    ds.PatientBirthDate, ds.PatientSex, ds.PatientAge = ident.birth_date, "F", "073Y"
    ds.PatientAddress = ident.address
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = ds.AcquisitionDate = ident.study_date
    ds.StudyTime = ds.SeriesTime = "101530.000000"
    ds.AccessionNumber, ds.StudyID = ident.accession, "STUDY7"
    ds.InstitutionName, ds.InstitutionAddress = ident.institution, ident.address
    ds.ReferringPhysicianName = ds.PerformingPhysicianName = ident.physician
    ds.StudyDescription = f"HEAD CT for {ident.name}"
    ds.Modality, ds.Manufacturer, ds.BodyPartExamined = "CT", "ACME", "HEAD"
    ds.SeriesNumber, ds.InstanceNumber = 2, index + 1
    ds.ImagePositionPatient = [0.0, 0.0, float(index) * 5.0]
    ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
    ds.PixelSpacing, ds.SliceThickness = [0.5, 0.5], 5.0
    ds.RescaleIntercept, ds.RescaleSlope = -1024, 1
    ds.WindowCenter, ds.WindowWidth = 40, 80
    ds.ReferencedStudySequence = Sequence([_nested(ident, ident.study_uid)])
    if ref_uid:
        ref = Dataset()
        ref.ReferencedSOPClassUID, ref.ReferencedSOPInstanceUID = CT_IMAGE_STORAGE, ref_uid
        ds.ReferencedImageSequence = Sequence([ref])
    ds.RequestAttributesSequence = Sequence([Dataset()])
    ds.RequestAttributesSequence[0].AccessionNumber = ident.accession
    ds.RequestAttributesSequence[0].RequestedProcedureID = ident.patient_id
    block = ds.private_block(0x0029, "ACME PRIVATE", create=True)
    block.add_new(0x10, "LO", ident.private_text)
    block.add_new(0x11, "UI", ident.study_uid)
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.Rows, ds.Columns = pixels.shape
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
    ds.PixelData = pixels.astype("<i2").tobytes()
    ds.save_as(path, enforce_file_format=True)
    return sop_uid


def ct_pixels(index: int, rows: int = 48, cols: int = 64) -> np.ndarray:
    """A head-ish CT slice in stored values (HU + 1024): a disc of brain, one dense dot."""
    yy, xx = np.mgrid[0:rows, 0:cols]
    img = np.full((rows, cols), -1000 + 1024, dtype=np.int16)  # air
    disc = (yy - rows / 2) ** 2 + (xx - cols / 2) ** 2 < (min(rows, cols) / 2.5) ** 2
    img[disc] = 30 + 1024 + index
    img[rows // 2 - 2 : rows // 2 + 2, cols // 2 + 6 : cols // 2 + 10] = 70 + 1024
    return img


def heatmap_png(hot: tuple[int, int], size: int = IMAGE_SIZE, radius: int = 4) -> bytes:
    """An 8-bit PNG anomaly map, zero except a bright square centred at ``hot`` = (y, x)."""
    img = np.zeros((size, size), dtype=np.uint8)
    y, x = hot
    img[max(0, y - radius) : y + radius, max(0, x - radius) : x + radius] = 255
    buf = io.BytesIO()
    Image.fromarray(img, mode="L").save(buf, format="PNG")
    return buf.getvalue()


@dataclass
class SyntheticRun:
    """What a test needs to know about the run it built."""

    run_dir: Path
    archive: Path
    identities: list[Identity]
    study_keys: list[str]
    files: dict[str, list[Path]]  # study_key -> archive files
    hot: dict[str, tuple[int, int]]  # slice_key -> (y, x) of the heatmap hot spot
    uids: list[str] = field(default_factory=list)
    schema_version: str = LEGACY_VERSION

    def locator(self):
        """A ``SourceLocator`` finding this run's files in its archive (keys recomputed)."""
        from pdd_batch.review.overlay import SourceLocator
        from pdd_batch.runs.results import open_run

        return SourceLocator.for_run(open_run(self.run_dir), archive=self.archive)


def _slice_row(
    study_key: str,
    series_key: str,
    z: int,
    source: str,
    score: float,
    flagged: bool,
    hot: tuple[int, int],
    spec: PreprocessSpec,
    modality: str,
    version: str = LEGACY_VERSION,
) -> dict:
    legacy = version == LEGACY_VERSION
    return {
        "schema_version": version,
        "slice_key": f"{series_key}:0:{z}",
        "study_key": study_key,
        "series_key": series_key,
        "volume_index": 0,
        "slice_index": z,
        "source_file" if legacy else "file_key": source if legacy else keys.file_key(source),
        "modality": modality,
        "score": score,
        "threshold": 0.5,
        "flagged": flagged,
        "heatmap_png": heatmap_png(hot),
        "heatmap_max": 2.0 * score,
        "model_id": MODEL_ID,
        "checkpoint_hash": CKPT_HASH,
        "preprocessing": spec.to_json(),
        "run_id": RUN_ID,
        "code_version": "0.1.0+test",
    }


def _study_row(key: str, rows: list[dict], modality: str) -> dict:
    version = rows[0]["schema_version"]
    scores = sorted((r["score"] for r in rows), reverse=True)
    n_flagged = sum(r["flagged"] for r in rows)
    top = max(rows, key=lambda r: r["score"])
    added = {}  # the study outcome's columns (2.1): every slice assessed, the rows' threshold
    if version == SCHEMA_VERSION:
        added = {"reason": None, "n_assessed": len(rows), "n_out_of_distribution": 0}
        added["threshold"] = rows[0]["threshold"]
    return {
        **added,
        "schema_version": version,
        "study_key": key,
        "n_series": 1,
        "n_slices": len(rows),
        "max_score": scores[0],
        "topk_mean": float(np.mean(scores[:3])),
        "n_flagged": n_flagged,
        "decision": "flagged" if n_flagged else "normal",
        "top_slice_key": top["slice_key"],
        "modality": modality,
        "model_id": MODEL_ID,
        "checkpoint_hash": CKPT_HASH,
        "run_id": RUN_ID,
    }


def _write_ct_study(
    archive: Path, ident: Identity, folder: str, n: int
) -> tuple[list[Path], list[str]]:
    series_uid, frame_uid = generate_uid(), generate_uid()
    out = archive / folder
    out.mkdir(parents=True)
    paths, uids = [], [ident.study_uid, series_uid, frame_uid]
    for z in range(n):
        p = out / f"IM{z:04d}.dcm"
        ref = uids[3] if z else None  # later slices reference the first one
        uids.append(write_ct_slice(p, ident, series_uid, z, ct_pixels(z), frame_uid, ref))
        paths.append(p)
    return paths, uids


def write_nifti(path: Path, ident: Identity) -> None:
    """A small MR-like NIfTI volume whose header text fields carry identifiers."""
    data = np.zeros((40, 40, 3), dtype=np.int16)
    data[10:30, 10:30, :] = 300
    img = nib.Nifti1Image(data, np.diag([1.0, 1.0, 3.0, 1.0]))
    img.header["descrip"] = ident.name.encode()[:79]
    img.header["aux_file"] = ident.patient_id.encode()[:23]
    img.header["db_name"] = ident.accession.encode()[:17]
    img.header["intent_name"] = ident.birth_date.encode()[:15]
    nib.save(img, str(path))


def build_run(
    base: Path, n_slices: int = 4, with_nifti: bool = True, schema_version: str = LEGACY_VERSION
) -> SyntheticRun:
    """Archive with two CT studies (one flagged, one normal) and a flagged NIfTI, plus its run
    (written as ``schema_version`` writes it, see the module docstring)."""
    v = schema_version
    if v not in (LEGACY_VERSION, SCHEMA_VERSION):
        raise ValueError(f"unknown schema version {v!r}")
    archive, run_dir = base / "archive", base / "run"
    spec = PreprocessSpec(image_size=IMAGE_SIZE)
    idents = [
        Identity(),
        Identity(
            name="Roe^Richard^P",
            patient_id="PID11112222",
            birth_date="19610909",
            accession="ACC99990000",
        ),
    ]
    slices, studies, files, hot, all_uids, study_keys = [], [], {}, {}, [], []
    for s, ident in enumerate(idents):
        paths, uids = _write_ct_study(
            archive, ident, f"{ident.name.split('^')[0]}/series{s}", n_slices
        )
        all_uids += uids
        if v == LEGACY_VERSION:
            study_key, series_key = _key(ident.study_uid), _key(uids[1])
        else:
            study_key = keys.study_key(ident.study_uid)
            series_key = keys.series_key(ident.study_uid, uids[1])
        rows = []
        for z, p in enumerate(paths):
            score = {1: 0.9, 2: 0.8}.get(z, 0.3 + 0.02 * z) if s == 0 else 0.2 + 0.01 * z
            flagged = score >= 0.5  # the threshold written in every row
            spot = (20 + 4 * z, 40 - 3 * z)
            row = _slice_row(
                study_key,
                series_key,
                z,
                p.relative_to(archive).as_posix(),
                score,
                flagged,
                spot,
                spec,
                "CT",
                v,
            )
            hot[row["slice_key"]] = spot
            rows.append(row)
        slices += rows
        studies.append(_study_row(study_key, rows, "CT"))
        files[study_key], study_keys = paths, study_keys + [study_key]
    if with_nifti:
        ident = Identity(
            name="Poe^Edgar^A",
            patient_id="PID33334444",
            birth_date="19090119",
            accession="ACC12121212",
        )
        idents.append(ident)
        p = archive / "nifti" / "Poe_Edgar_t1.nii.gz"
        p.parent.mkdir(parents=True)
        write_nifti(p, ident)
        rel = p.relative_to(archive).as_posix()
        study_key = series_key = _key(rel) if v == LEGACY_VERSION else keys.hash_key("n", rel)
        rows = []
        for z in range(3):
            spot = (30, 12 + 8 * z)
            score = (0.3, 0.7, 0.4)[z]
            row = _slice_row(
                study_key, series_key, z, rel, score, score >= 0.5, spot, spec, "MR", v
            )
            hot[row["slice_key"]] = spot
            rows.append(row)
        slices += rows
        studies.append(_study_row(study_key, rows, "MR"))
        files[study_key], study_keys = [p], study_keys + [study_key]
    _write_tables(run_dir, archive, slices, studies, v)
    return SyntheticRun(run_dir, archive, idents, study_keys, files, hot, all_uids, v)


def _write_tables(
    run_dir: Path, archive: Path, slices: list[dict], studies: list[dict], version: str
) -> None:
    legacy = version == LEGACY_VERSION
    junk = "junk/notdicom.dcm"
    errors = [
        {
            "schema_version": version,
            "file" if legacy else "file_key": junk if legacy else keys.file_key(junk),
            "series_key": None,
            "stage": "discover",
            "status": "failed",
            "reason": "not a DICOM or NIfTI file",
            "run_id": RUN_ID,
        }
    ]
    schemas = LEGACY_TABLES if legacy else TABLES
    for name, rows, schema in (
        ("slices", slices, schemas["slices"]),
        ("studies", studies, schemas["studies"]),
        ("errors", errors, schemas["errors"]),
    ):
        (run_dir / name).mkdir(parents=True)
        pq.write_table(pa.Table.from_pylist(rows, schema=schema), run_dir / name / "part-0.parquet")
    n_files = len({r["source_file" if legacy else "file_key"] for r in slices})
    manifest = {
        "schema_version": version,
        "run_id": RUN_ID,
        "model_id": MODEL_ID,
        "checkpoint_hash": CKPT_HASH,
        **({"archive_root": str(archive)} if legacy else {"key_id": keys.site_key().key_id}),
        "status": "completed",
        "inputs_seen": n_files + 1,
        "inputs_scored": n_files,
        "inputs_skipped": 0,
        "inputs_failed": 1,
        "versions": {"pdd_batch": "0.1.0"},
    }
    (run_dir / "manifest.json").write_text(json.dumps(manifest, indent=1))
