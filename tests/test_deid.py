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
from pydicom.uid import generate_uid
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


def test_dates_shifted_by_one_offset_per_patient(series) -> None:
    ident, paths, _ = series
    deid = Deidentifier()
    out = [deid.deidentify(pydicom.dcmread(p)) for p in paths]
    offset = deid.date_offset_days(ident.patient_id)
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


def _roundtrip(ds: Dataset, path: Path) -> Dataset:
    """Save ``ds`` as a file and read it back (what export writes, what a viewer reads)."""
    ds.save_as(path, enforce_file_format=True)
    return pydicom.dcmread(path)


def _named_slice(tmp_path: Path, ident: Identity, date: str | None = None) -> Dataset:
    """A real CT slice file of ``ident`` (study date ``date``), read back."""
    path = tmp_path / f"{generate_uid()}.dcm"
    write_ct_slice(path, ident, generate_uid(), 0, ct_pixels(0), generate_uid())
    ds = pydicom.dcmread(path)
    if date is not None:
        ds.StudyDate = ds.SeriesDate = ds.ContentDate = ds.AcquisitionDate = date
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    return _roundtrip(ds, path)


@pytest.mark.parametrize(
    "name",
    [
        "ONO^KENJI",  # MONOCHROME2 holds ONO
        "SMITH^MARY",  # PRIMARY holds MARY
        "ROSSI^GINA",  # ORIGINAL holds GINA
        "XIA^WEI",  # AXIAL holds XIA
        "LI^NA",  # two-letter family and given names
        "NG^YU^MEI",
        "SMITH-JONES^ANNE-MARIE",  # each half of a double name is a name part
    ],
)
def test_safety_scan_keeps_coded_values_and_removes_whole_word_names(
    tmp_path: Path, name: str
) -> None:
    """Surnames that are substrings of coded values (CS) must not delete required attributes;
    the names are still removed where they stand as words in free text, 2 letters included."""
    family, given = (part.split("-")[-1] for part in name.split("^")[:2])
    ds = _named_slice(tmp_path, Identity(name=name))
    ds.Manufacturer = f"{family.title()} Imaging"  # LO: the surname as a word
    ds.SoftwareVersions = f"build for {given.lower()}"  # LO: the given name, lower case
    ds.ManufacturerModelName = f"X{family}9 scanner"  # LO: inside a longer word only
    ds.ConvolutionKernel = "B30f"
    ds = _roundtrip(ds, tmp_path / "in.dcm")
    pixels = ds.PixelData
    out = _roundtrip(Deidentifier().deidentify(ds), tmp_path / "out.dcm")
    assert out.PhotometricInterpretation == "MONOCHROME2"
    assert list(out.ImageType) == ["ORIGINAL", "PRIMARY", "AXIAL"]
    assert out.BodyPartExamined == "HEAD" and out.ConvolutionKernel == "B30f"
    assert out.ManufacturerModelName == f"X{family}9 scanner"
    assert "Manufacturer" not in out and "SoftwareVersions" not in out
    assert out.PixelData == pixels


def test_dates_of_two_studies_of_one_patient_keep_their_interval(tmp_path: Path) -> None:
    """Option 113107 (longitudinal temporal information): one offset per patient, so the
    interval between a patient's studies survives; another patient moves by another offset."""
    import datetime as dt

    first = Identity(patient_id="PID-LONG-1")
    second = Identity(patient_id="PID-LONG-1")  # same patient, a new study UID
    others = [Identity(patient_id=f"PID-OTHER-{i}") for i in range(4)]
    deid = Deidentifier()
    a = _roundtrip(deid.deidentify(_named_slice(tmp_path, first, "20200110")), tmp_path / "a")
    b = _roundtrip(deid.deidentify(_named_slice(tmp_path, second, "20210315")), tmp_path / "b")

    def day(ds: Dataset, kw: str = "StudyDate") -> dt.date:
        return dt.datetime.strptime(ds.data_element(kw).value, "%Y%m%d").date()

    assert a.StudyInstanceUID != b.StudyInstanceUID and a.PatientID == b.PatientID
    assert (day(b) - day(a)).days == (dt.date(2021, 3, 15) - dt.date(2020, 1, 10)).days
    assert day(a) < dt.date(2020, 1, 10) and day(a, "SeriesDate") == day(a)
    shifts = {
        (day(deid.deidentify(_named_slice(tmp_path, o, "20200110"))) - dt.date(2020, 1, 10)).days
        for o in others
    }
    assert len(shifts | {(day(a) - dt.date(2020, 1, 10)).days}) > 1  # not one global offset
    assert deid.crosswalk[b.StudyInstanceUID]["date_offset_days"] == str(
        (day(a) - dt.date(2020, 1, 10)).days
    )


def test_nested_patient_ids_replaced(tmp_path: Path, series) -> None:
    """A PatientID inside any sequence item (another patient's, or this one's) is replaced by
    the pseudonym of its own value; the reference sequences that carry them are removed."""
    ident, paths, _ = series
    other = "OTHER-PATIENT-5150"
    ds = pydicom.dcmread(paths[1])
    ds.ReferencedImageSequence[0].PatientID = other
    source = Dataset()
    source.ReferencedSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    source.ReferencedSOPInstanceUID = generate_uid()
    source.PatientID = ident.patient_id
    ds.SourceImageSequence = [source]
    for kw in ("ReferencedPatientSequence", "OtherPatientIDsSequence"):
        item = Dataset()
        item.PatientID = other
        setattr(ds, kw, [item])
    ds.RequestAttributesSequence[0].PatientID = other
    ds = _roundtrip(ds, tmp_path / "in.dcm")
    deid = Deidentifier()
    out = _roundtrip(deid.deidentify(ds), tmp_path / "out.dcm")
    raw = (tmp_path / "out.dcm").read_bytes()
    assert other.encode() not in raw and ident.patient_id.encode() not in raw
    assert out.ReferencedImageSequence[0].PatientID == deid.pseudonym(other)
    assert out.SourceImageSequence[0].PatientID == out.PatientID == deid.pseudonym(ident.patient_id)
    for kw in ("ReferencedPatientSequence", "OtherPatientIDsSequence", "RequestAttributesSequence"):
        assert kw not in out


def test_free_text_outside_the_profile_table_removed(tmp_path: Path, series) -> None:
    """Long free text (UT/LT/ST), LO/SH comments and descriptions, and public elements the
    dictionary does not know are removed even though the profile table does not list them;
    coded and technical values stay."""
    _, paths, _ = series
    ds = pydicom.dcmread(paths[0])
    ds.ReasonForVisit = "fell at home, neighbour found her"  # UT
    ds.CommentsOnRadiationDose = "repeat scan, patient moved"  # ST
    ds.ReconstructionDescription = "redone for Dr Who's trial"  # LO ...Description
    ds.add_new(0x00181999, "LO", "unknown public element text")  # not in the dictionary
    code = Dataset()
    code.CodeValue, code.CodingSchemeDesignator, code.CodeMeaning = "T-A0100", "SRT", "Brain"
    ds.AnatomicRegionSequence = [code]
    ds.ConvolutionKernel = "H30s"
    ds = _roundtrip(ds, tmp_path / "in.dcm")
    out = _roundtrip(Deidentifier().deidentify(ds), tmp_path / "out.dcm")
    for kw in ("ReasonForVisit", "CommentsOnRadiationDose", "ReconstructionDescription"):
        assert kw not in out, kw
    assert 0x00181999 not in out
    assert out.AnatomicRegionSequence[0].CodeMeaning == "Brain"
    assert out.ConvolutionKernel == "H30s" and out.Manufacturer == "ACME"


def test_encrypted_attributes_and_overlay_text_removed(tmp_path: Path, series) -> None:
    """EncryptedAttributesSequence (may hold the original identifiers) and whole overlay planes
    (description and label are free text; without its data a plane is meaningless) go."""
    _, paths, _ = series
    ds = pydicom.dcmread(paths[0])
    encrypted = Dataset()
    encrypted.EncryptedContentTransferSyntaxUID = "1.2.840.10008.1.2.1"
    encrypted.EncryptedContent = b"ENCRYPTED-ORIGINALS-" * 4
    ds.EncryptedAttributesSequence = [encrypted]
    for tag, vr, value in (
        (0x60000010, "US", 48), (0x60000011, "US", 64), (0x60000040, "CS", "G"),
        (0x60000050, "SS", [1, 1]), (0x60000100, "US", 1), (0x60000102, "US", 0),
        (0x60000022, "LO", "arrow: ward 7 bed 3"), (0x60001500, "LO", "BED3-MARKER"),
        (0x60003000, "OW", b"\x00" * (48 * 64 // 8)),
    ):  # fmt: skip
        ds.add_new(tag, vr, value)
    ds = _roundtrip(ds, tmp_path / "in.dcm")
    pixels = ds.PixelData
    out = _roundtrip(Deidentifier().deidentify(ds), tmp_path / "out.dcm")
    raw = (tmp_path / "out.dcm").read_bytes()
    assert "EncryptedAttributesSequence" not in out
    assert not [e for e in out.iterall() if 0x6000 <= e.tag.group <= 0x60FF]
    for text in (b"ENCRYPTED-ORIGINALS", b"ward 7 bed 3", b"BED3-MARKER"):
        assert text not in raw
    assert out.PixelData == pixels


@pytest.mark.parametrize("suffix", [".nii", ".nii.gz"])
def test_nifti_data_type_text_blanked(tmp_path: Path, suffix: str) -> None:
    """data_type (an unused ANALYZE 7.5 text field of the NIfTI-1 header) is blanked too."""
    ident = Identity()
    src, dst = tmp_path / f"in{suffix}", tmp_path / f"out{suffix}"
    write_nifti(src, ident)
    img = nib.load(src, mmap=False)
    img.header["data_type"] = b"MRN-4711"
    nib.save(img, src)
    assert nib.load(src).header["data_type"].tobytes().startswith(b"MRN-4711")
    deidentify_nifti_file(src, dst)
    raw = dst.read_bytes()
    raw = gzip.decompress(raw) if suffix == ".nii.gz" else raw
    assert b"MRN-4711" not in raw
    assert nib.load(dst).header["data_type"].tobytes().strip(b"\x00") == b""
