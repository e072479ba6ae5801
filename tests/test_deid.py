"""De-identification (`pdd_batch.review.deid`): PS3.15 basic profile on DICOM, NIfTI header text."""

from __future__ import annotations

import gzip
import io
import re
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset
from run_factory import Identity, ct_pixels, write_ct_slice, write_nifti

from pdd_batch.review.deid import (
    Deidentifier,
    DeidError,
    deidentify_nifti_bytes,
    deidentify_nifti_file,
)

NEW_UID = re.compile(r"^2\.25\.\d{1,39}$")


def _all_elements(ds: Dataset):
    """Every element, recursively through sequences (and the file meta)."""
    meta = getattr(ds, "file_meta", None)
    if meta is not None:
        yield from meta
    yield from ds.iterall()


@pytest.fixture
def series(tmp_path: Path) -> tuple[Identity, list[Path], list[str]]:
    ident = Identity()
    series_uid, frame_uid = pydicom.uid.generate_uid(), pydicom.uid.generate_uid()
    paths, sops = [], []
    for z in range(3):
        p = tmp_path / f"{z}.dcm"
        sops.append(
            write_ct_slice(p, ident, series_uid, z, ct_pixels(z), frame_uid, sops[0] if z else None)
        )
        paths.append(p)
    return ident, paths, [ident.study_uid, series_uid, frame_uid, *sops]


def test_no_identifier_survives_anywhere(series) -> None:
    ident, paths, uids = series
    deid = Deidentifier()
    for p in paths:
        original = pydicom.dcmread(p)
        original_pixels = original.PixelData
        ds = deid.deidentify(pydicom.dcmread(p))
        assert ds.PixelData == original_pixels
        for elem in _all_elements(ds):
            assert not elem.tag.is_private, elem
            if elem.VR == "SQ":
                continue
            text = str(elem.value)
            for s in ident.strings() + uids:
                assert s not in text, f"{elem.keyword} still holds an identifier"
        assert ds.PatientIdentityRemoved == "YES"
        assert ds.DeidentificationMethod
        codes = [c.CodeValue for c in ds.DeidentificationMethodCodeSequence]
        assert codes == ["113100", "113107"]
        assert ds.LongitudinalTemporalInformationModified == "MODIFIED"
        assert ds.PatientBirthDate == "" and ds.AccessionNumber == ""
        assert "InstitutionName" not in ds and "OtherPatientIDsSequence" not in ds
        assert "RequestAttributesSequence" not in ds and "PatientAddress" not in ds


def test_uids_replaced_consistently_and_valid(series) -> None:
    _, paths, uids = series
    deid = Deidentifier()
    out = [deid.deidentify(pydicom.dcmread(p)) for p in paths]
    assert len({d.StudyInstanceUID for d in out}) == 1
    assert len({d.SeriesInstanceUID for d in out}) == 1
    assert len({d.FrameOfReferenceUID for d in out}) == 1
    assert len({d.SOPInstanceUID for d in out}) == 3
    for d in out:
        for uid in (d.StudyInstanceUID, d.SeriesInstanceUID, d.SOPInstanceUID):
            assert NEW_UID.match(uid) and len(uid) <= 64
        assert d.file_meta.MediaStorageSOPInstanceUID == d.SOPInstanceUID
        assert d.SOPClassUID == "1.2.840.10008.5.1.4.1.1.2"  # class UIDs are kept
    # nested reference to the first slice follows that slice's new UID
    for d in out[1:]:
        ref = d.ReferencedImageSequence[0]
        assert ref.ReferencedSOPInstanceUID == out[0].SOPInstanceUID
        assert ref.ReferencedSOPClassUID == "1.2.840.10008.5.1.4.1.1.2"
    # a second pass over the same originals maps to the same UIDs; another key does not
    again = deid.deidentify(pydicom.dcmread(paths[1]))
    assert again.SOPInstanceUID == out[1].SOPInstanceUID
    other = Deidentifier().deidentify(pydicom.dcmread(paths[1]))
    assert other.SOPInstanceUID != out[1].SOPInstanceUID


def test_dates_shifted_by_one_offset_per_study(series) -> None:
    ident, paths, _ = series
    deid = Deidentifier()
    out = [deid.deidentify(pydicom.dcmread(p)) for p in paths]
    offset = deid.date_offset_days(ident.study_uid)
    assert offset < 0
    import datetime as dt

    orig = dt.datetime.strptime(ident.study_date, "%Y%m%d").date()
    for d in out:
        for kw in ("StudyDate", "SeriesDate", "ContentDate", "AcquisitionDate"):
            shifted = dt.datetime.strptime(d.data_element(kw).value, "%Y%m%d").date()
            assert (shifted - orig).days == offset
    no_shift = Deidentifier(shift_dates=False).deidentify(pydicom.dcmread(paths[0]))
    assert no_shift.StudyDate == ""
    assert no_shift.LongitudinalTemporalInformationModified == "REMOVED"
    assert [c.CodeValue for c in no_shift.DeidentificationMethodCodeSequence] == ["113100"]


def test_safety_scan_removes_leftover_identifiers(series) -> None:
    ident, paths, _ = series
    ds = pydicom.dcmread(paths[0])
    ds.Manufacturer = f"{ident.name.split('^')[0]} Imaging"  # not in the profile table
    ds.BodyPartExamined = "HEAD"
    out = Deidentifier().deidentify(ds)
    assert "Manufacturer" not in out
    assert out.BodyPartExamined == "HEAD"


def test_crosswalk_records_originals(series) -> None:
    ident, paths, _ = series
    deid = Deidentifier()
    ds = deid.deidentify(pydicom.dcmread(paths[0]))
    entry = deid.crosswalk[ds.StudyInstanceUID]
    assert entry["original_patient_id"] == ident.patient_id
    assert entry["original_study_uid"] == ident.study_uid
    assert entry["new_patient_id"] == ds.PatientID == str(ds.PatientName)


@pytest.mark.parametrize("suffix", [".nii", ".nii.gz"])
def test_nifti_header_text_stripped_pixels_kept(tmp_path: Path, suffix: str) -> None:
    ident = Identity()
    plain, src, dst = (tmp_path / f"{n}{suffix}" for n in ("plain", "in", "out"))
    write_nifti(plain, ident)
    a = nib.load(plain, mmap=False)
    a.header.extensions.append(nib.nifti1.Nifti1Extension(6, ident.name.encode()))  # comment
    nib.save(a, src)
    deidentify_nifti_file(src, dst)
    a, b = nib.load(src, mmap=False), nib.load(dst, mmap=False)
    for key in ("descrip", "aux_file", "db_name", "intent_name"):
        assert b.header[key].tobytes().strip(b"\x00") == b""
    assert len(b.header.extensions) == 0
    assert np.array_equal(np.asanyarray(a.dataobj), np.asanyarray(b.dataobj))
    assert np.allclose(a.affine, b.affine)
    raw_in, raw_out = src.read_bytes(), dst.read_bytes()
    if suffix == ".nii.gz":
        raw_in, raw_out = gzip.decompress(raw_in), gzip.decompress(raw_out)
    off_in = int(nib.Nifti1Header.from_fileobj(io.BytesIO(raw_in))["vox_offset"])
    off_out = int(nib.Nifti1Header.from_fileobj(io.BytesIO(raw_out))["vox_offset"])
    assert len(a.header.extensions) == 1 and off_in > off_out == 352
    assert raw_out[off_out:] == raw_in[off_in:]  # image bytes unchanged
    for s in ident.strings():
        assert s.encode() not in raw_out


def test_nifti_bad_header_is_a_clear_error() -> None:
    with pytest.raises(DeidError, match="broken.nii"):
        deidentify_nifti_bytes(b"\x00" * 10, "broken.nii")


@pytest.mark.realdata
def test_real_dicom_every_transfer_syntax(tmp_path: Path) -> None:
    """One file per shared series plus the 9 transfer syntaxes: pixels byte-identical after a
    save/re-read, no private tag, no original name/ID/UID left in the bytes."""
    from conftest import shared_path

    root = shared_path("data", "dicom")
    files = sorted(root.glob("transfer_syntaxes_dcm_qa_ts/In/*.dcm"))
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        files += sorted(folder.rglob("*.dcm"))[:1]
    assert len(files) >= 12
    keys = ("PatientName", "PatientID", "StudyInstanceUID", "SeriesInstanceUID",
            "SOPInstanceUID", "PatientBirthDate", "AccessionNumber", "InstitutionName")  # fmt: skip
    for f in files:
        ds = pydicom.dcmread(f)
        originals = [str(ds.get(k, "") or "") for k in keys]
        pixels = ds.PixelData
        out = tmp_path / "out.dcm"
        Deidentifier().deidentify(ds).save_as(out, enforce_file_format=True)
        raw, back = out.read_bytes(), pydicom.dcmread(out)
        assert back.PixelData == pixels, f.name
        assert back.pixel_array.size > 0
        assert not [e for e in back.iterall() if e.tag.is_private], f.name
        leaks = [v for v in originals if len(v) >= 4 and v.encode() in raw]
        assert not leaks, f.name


# Basic-profile (PS3.15 Table E.1-1) attributes outside the first table: values that identify
# the patient but share no text with the name/ID, so the final safety scan cannot catch them.
PROFILE_EXTRA = {
    "EthnicGroup": "ETHNIC-TOKEN",
    "InsurancePlanIdentification": "INSURANCE-778899",
    "PatientInstitutionResidence": "Ward 7 Northwing",
    "ReasonForTheRequestedProcedure": "fall at 12 Elm Street",
    "PatientTelecomInformation": "tel 555 0199",
    "ClinicalTrialSubjectID": "SUBJ-0042",
    "CommentsOnThePerformedProcedureStep": "patient anxious, daughter present",
    "AdmittingTime": "101500",
    "PatientBirthDateInAlternativeCalendar": "1327/06/15",
    "PatientDeathDateInAlternativeCalendar": "1399/01/02",
    "PersonTelecomInformation": "tel 555 0142",
    "OrderCallbackTelecomInformation": "tel 555 0177",
}


def test_profile_attributes_beyond_the_first_table_removed(series) -> None:
    _, paths, _ = series
    ds = pydicom.dcmread(paths[0])
    for kw, value in PROFILE_EXTRA.items():
        setattr(ds, kw, value)
    person = Dataset()
    person.CodeValue, person.CodingSchemeDesignator = "STAFF-6543", "L"
    ds.PersonIdentificationCodeSequence = [person]
    groups = []
    for kw in ("SourcePatientGroupIdentificationSequence", "GroupOfPatientsIdentificationSequence"):
        other = Dataset()
        other.PatientID = "OTHER-PATIENT-777"  # another patient's ID: the final scan misses it
        setattr(ds, kw, [other])
        groups.append(kw)
    out = Deidentifier().deidentify(ds)
    for kw in [*PROFILE_EXTRA, "PersonIdentificationCodeSequence", *groups]:
        assert kw not in out, f"{kw} survived de-identification"


def test_file_meta_keeps_only_standard_non_identifying_elements(series) -> None:
    ident, paths, uids = series
    ds = pydicom.dcmread(paths[0])
    meta = ds.file_meta
    meta.SourceApplicationEntityTitle = "SRC_AE"
    meta.SendingApplicationEntityTitle = "SEND_AE"
    meta.ReceivingApplicationEntityTitle = "RECV_AE"
    meta.PrivateInformationCreatorUID = "1.2.3.4.9999"
    meta.PrivateInformation = f"{ident.private_text} {ident.name}".encode()
    original_meta_uid = meta.MediaStorageSOPInstanceUID
    del ds.SOPInstanceUID  # a broken file: the meta holds the only instance UID
    out = Deidentifier().deidentify(ds)
    kept = {e.keyword for e in out.file_meta}
    assert kept <= {
        "FileMetaInformationGroupLength", "FileMetaInformationVersion", "MediaStorageSOPClassUID",
        "MediaStorageSOPInstanceUID", "TransferSyntaxUID", "ImplementationClassUID",
        "ImplementationVersionName",
    }  # fmt: skip
    buf = io.BytesIO()
    out.save_as(buf, enforce_file_format=True)
    raw = buf.getvalue()
    for s in [*ident.strings(), *uids, original_meta_uid, "1.2.3.4.9999", "SRC_AE", "SEND_AE"]:
        assert s.encode() not in raw, "an identifier survived in the file meta"
    assert NEW_UID.match(out.file_meta.MediaStorageSOPInstanceUID)
