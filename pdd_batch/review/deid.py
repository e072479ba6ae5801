"""De-identification of DICOM datasets (PS3.15 Annex E basic profile) and NIfTI headers.

DICOM, applied recursively to every nested sequence item:

* private tags, curves (50xx) and whole overlay planes (60xx: data, comments, description,
  label) are removed; the file meta keeps only its standard elements (no AE titles, addresses
  or private information); EncryptedAttributesSequence (which may hold the originals) goes;
* attributes of the basic profile table below are removed (X) or emptied (Z);
* free text outside that table is removed too: every LT/ST/UT/UC element (except
  LongCodeValue), LO/SH elements named ...Comment(s)/...Description/...Notes, and public
  elements the dictionary does not know;
* every UID (VR UI) that is not a registry UID (``1.2.840.10008.*``) is replaced by
  ``2.25.<int>`` derived with a keyed hash, so the same original UID gets the same new UID in
  every file of one export, and the original cannot be recovered without the key;
* person names are emptied; PatientName/PatientID become a pseudonym of the original PatientID,
  and a PatientID nested in any sequence item becomes the pseudonym of its own value;
* dates (DA, DT) are shifted by a per-patient offset of whole days (option 113107), so two
  studies of one patient keep their interval; birth date emptied; times are kept;
* a final scan removes any free-text element (PN, LO, SH, ST, LT, UT, UC) that still holds an
  identifying value of the input: a patient name part of 2 or more characters (family, given
  and middle names; not prefixes or suffixes) as a whole word, case-insensitive; an ID,
  accession number, UID, birth date or institution name (4 or more characters) anywhere in the
  text. Coded values (CS, DS, IS, UI...) are never scanned, so a surname such as ONO cannot
  delete PhotometricInterpretation (MONOCHROME2);
* PatientIdentityRemoved, DeidentificationMethod(+CodeSequence) and
  LongitudinalTemporalInformationModified are recorded.

Pixel data is never touched: ``pdd_batch.review.burned_in`` says which files may show burned-in
text (export withholds them by default). NIfTI: header text fields (descrip, aux_file, db_name,
intent_name, data_type) are blanked and header extensions dropped; the image bytes are copied
unchanged.
"""

from __future__ import annotations

import datetime as dt
import gzip
import hashlib
import hmac
import io
import logging
import re
import secrets
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.sequence import Sequence

log = logging.getLogger(__name__)

REGISTRY_UID_ROOT = "1.2.840.10008."
METHOD = "DICOM PS3.15 E.1 Basic Profile; pdd-batch"  # LO: at most 64 characters
CODES = {
    "basic": ("113100", "Basic Application Confidentiality Profile"),
    "dates": ("113107", "Retain Longitudinal Temporal Information Modified Dates Option"),
}
# UIDs that name a class or scheme, not an instance: kept (not in the basic profile table).
KEEP_UIDS = frozenset(
    "SOPClassUID ReferencedSOPClassUID MediaStorageSOPClassUID TransferSyntaxUID "
    "ImplementationClassUID CodingSchemeUID ContextGroupExtensionCreatorUID "
    "RelatedGeneralSOPClassUID OriginalSpecializedSOPClassUID".split()
)
# File meta elements that identify nothing; the rest (AE titles, presentation addresses,
# PrivateInformationCreatorUID/PrivateInformation) is removed.
META_KEEP = frozenset(
    "FileMetaInformationGroupLength FileMetaInformationVersion MediaStorageSOPClassUID "
    "MediaStorageSOPInstanceUID TransferSyntaxUID ImplementationClassUID "
    "ImplementationVersionName".split()
)
# Free-text VRs: the only ones the final safety scan reads (coded values are never scanned).
FREE_TEXT_VRS = frozenset({"PN", "LO", "SH", "ST", "LT", "UT", "UC"})
# Long free text outside the profile table is removed; these few are codes, kept.
LONG_TEXT_VRS = frozenset({"ST", "LT", "UT", "UC"})
KEEP_LONG_TEXT = frozenset({"LongCodeValue"})
FREE_TEXT_SUFFIXES = ("Comment", "Comments", "Description", "Notes")

# Basic profile (PS3.15 Table E.1-1), action X: remove.
REMOVE = frozenset(
    """
AcquisitionComments AcquisitionContextSequence AcquisitionDeviceProcessingDescription
AdditionalPatientHistory AdmissionID AdmittingDiagnosesCodeSequence AdmittingDiagnosesDescription
Allergies AuthorObserverSequence BranchOfService CassetteID ConsultingPhysicianName
ConsultingPhysicianIdentificationSequence ContentCreatorIdentificationCodeSequence ContentSequence
ContributionDescription CountryOfResidence CurrentPatientLocation CustodialOrganizationSequence
DataSetTrailingPadding DerivationDescription DetectorID DeviceSerialNumber
DigitalSignaturesSequence DischargeDiagnosisDescription DistributionAddress DistributionName
FrameComments GantryID GeneratorID
GraphicAnnotationSequence HumanPerformerName HumanPerformerOrganization IconImageSequence
IdentifyingComments ImageComments ImagePresentationComments ImagingServiceRequestComments
Impressions
InstitutionAddress InstitutionalDepartmentName InstitutionCodeSequence InstitutionName
IntendedRecipientsOfResultsIdentificationSequence InterpretationApproverSequence
InterpretationAuthor InterpretationDiagnosisDescription InterpretationRecorder InterpretationText
InterpretationTranscriber IssuerOfAdmissionID IssuerOfPatientID IssuerOfServiceEpisodeID
MedicalAlerts MedicalRecordLocator MilitaryRank ModifiedAttributesSequence ModifyingDeviceID
ModifyingDeviceManufacturer NameOfPhysiciansReadingStudy NamesOfIntendedRecipientsOfResults
Occupation OperatorIdentificationSequence OperatorsName OrderCallbackPhoneNumber OrderEnteredBy
OrderEntererLocation OriginalAttributesSequence OtherPatientIDs OtherPatientIDsSequence
OtherPatientNames ParticipantSequence PatientAddress PatientAge PatientBirthName PatientBirthTime
PatientComments PatientInsurancePlanCodeSequence PatientMotherBirthName
PatientPrimaryLanguageCodeSequence PatientReligiousPreference PatientSize PatientState
PatientTelephoneNumbers PatientTransportArrangements PatientWeight PerformedLocation
PerformedProcedureStepDescription PerformedProcedureStepID PerformedStationAETitle
PerformedStationGeographicLocationCodeSequence PerformedStationName PerformedStationNameCodeSequence
PerformingPhysicianIdentificationSequence PerformingPhysicianName PersonAddress
PersonTelephoneNumbers PhysicianApprovingInterpretation PhysiciansOfRecord
PhysiciansOfRecordIdentificationSequence PhysiciansReadingStudyIdentificationSequence PlateID
PreMedication PregnancyStatus ProtocolName ReasonForStudy ReasonForTheImagingServiceRequest
ReferencedDigitalSignatureSequence ReferencedPatientAliasSequence ReferencedPatientSequence
ReferencedPerformedProcedureStepSequence ReferencedSOPInstanceMACSequence ReferencedStudySequence
ReferringPhysicianAddress ReferringPhysicianIdentificationSequence
ReferringPhysicianTelephoneNumbers RegionOfResidence RequestAttributesSequence
RequestedContrastAgent RequestedProcedureComments RequestedProcedureDescription RequestedProcedureID
RequestedProcedureLocation RequestingPhysician RequestingService ResponsibleOrganization
ResponsiblePerson ResultsComments ResultsDistributionListSequence ResultsIDIssuer
ScheduledHumanPerformersSequence ScheduledPatientInstitutionResidence
ScheduledPerformingPhysicianIdentificationSequence ScheduledPerformingPhysicianName
ScheduledProcedureStepDescription ScheduledProcedureStepID ScheduledProcedureStepLocation
ScheduledStationAETitle ScheduledStationGeographicLocationCodeSequence ScheduledStationName
ScheduledStationNameCodeSequence ScheduledStudyLocation ScheduledStudyLocationAETitle
SeriesDescription ServiceEpisodeDescription ServiceEpisodeID SmokingStatus
SourceApplicationEntityTitle SpecialNeeds StationName StudyComments StudyDescription StudyIDIssuer
TextComments TextString TopicAuthor TopicKeywords TopicSubject TopicTitle
VerifyingObserverIdentificationCodeSequence VerifyingOrganization VisitComments
AcquisitionProtocolDescription AdmittingDate AdmittingTime Arbitrary ClinicalTrialSubjectID
ClinicalTrialSubjectReadingID CommentsOnThePerformedProcedureStep
ConfidentialityConstraintOnPatientDataDescription EthnicGroup EthnicGroupCodeSequence
InsurancePlanIdentification IssuerOfPatientIDQualifiersSequence LastMenstrualDate MAC
ModifiedImageDescription PatientInstitutionResidence PatientPrimaryLanguageModifierCodeSequence
PatientSexNeutered PatientTelecomInformation PersonIdentificationCodeSequence
ReasonForTheRequestedProcedure ReferencedPatientPhotoSequence OrderCallbackTelecomInformation
PatientBirthDateInAlternativeCalendar PatientDeathDateInAlternativeCalendar PersonTelecomInformation
SourcePatientGroupIdentificationSequence GroupOfPatientsIdentificationSequence
EncryptedAttributesSequence EncryptedContent
""".split()
)

# Basic profile action Z: keep the attribute, empty its value (type 2 attributes).
EMPTY = frozenset(
    """
AccessionNumber ContentCreatorName FillerOrderNumberImagingServiceRequest PatientBirthDate
PatientSex PlacerOrderNumberImagingServiceRequest ReferringPhysicianName StudyID
VerifyingObserverName
""".split()
)


class DeidError(ValueError):
    """A file that cannot be de-identified; the message names the file, never its identifiers."""


def _keyed_int(key: bytes, text: str, nbytes: int = 16) -> int:
    return int.from_bytes(hmac.new(key, text.encode(), hashlib.sha256).digest()[:nbytes], "big")


@dataclass
class Deidentifier:
    """Keyed, consistent replacement of identifiers across all files of one export.

    Attributes:
        key: secret for the keyed hashes (random per export unless given).
        shift_dates: shift dates by a per-patient offset (else dates are emptied).
        max_shift_days: offsets lie in ``[-max_shift_days, -1]`` days.
        crosswalk: new study UID -> original identifiers, filled as studies are seen; written
            only when the user asks for a crosswalk.
    """

    key: bytes = field(default_factory=lambda: secrets.token_bytes(32))
    shift_dates: bool = True
    max_shift_days: int = 3650
    crosswalk: dict[str, dict[str, str]] = field(default_factory=dict)

    def new_uid(self, uid: str) -> str:
        """``2.25.<int>`` for a UID; registry UIDs (``1.2.840.10008.*``) are kept."""
        uid = uid.strip().rstrip("\x00")
        if not uid or uid.startswith(REGISTRY_UID_ROOT):
            return uid
        return f"2.25.{_keyed_int(self.key, 'uid:' + uid)}"

    def pseudonym(self, patient_id: str) -> str:
        """A stable pseudonymous patient ID (``PDD`` + 12 hex digits)."""
        return f"PDD{_keyed_int(self.key, 'pid:' + patient_id, 6):012X}"

    def date_offset_days(self, patient_key: str) -> int:
        """The per-patient date shift in days (negative, never zero).

        Args:
            patient_key: the original PatientID (the StudyInstanceUID where it is empty), so
                every study of one patient moves by the same offset and keeps its interval.
        """
        return -(1 + _keyed_int(self.key, "date:" + patient_key, 4) % self.max_shift_days)

    def identify(self, ds: Dataset) -> tuple[str, str]:
        """The new study UID and patient pseudonym of ``ds`` (recorded for the crosswalk),
        without de-identifying it: for a file that is withheld rather than written."""
        study_uid, pid = _study_and_patient(ds)
        offset = self.date_offset_days(pid) if self.shift_dates else None
        self._record(ds, study_uid, pid, offset)
        return self.new_uid(study_uid), self.pseudonym(pid)

    def deidentify(self, ds: Dataset) -> Dataset:
        """De-identify ``ds`` in place (file meta included) and return it."""
        study_uid, pid = _study_and_patient(ds)
        secrets_ = _identifying_values(ds)
        offset = self.date_offset_days(pid) if self.shift_dates else None
        self._record(ds, study_uid, pid, offset)
        _walk(ds, self, offset)
        _scrub_remaining(ds, _scan_pattern(secrets_))
        pseudo = self.pseudonym(pid)
        ds.PatientName, ds.PatientID = pseudo, pseudo
        _mark(ds, offset is not None)
        meta = getattr(ds, "file_meta", None)
        if meta is not None:
            self._deidentify_meta(ds, meta)
        return ds

    def _deidentify_meta(self, ds: Dataset, meta: Dataset) -> None:
        """Keep only the standard file meta elements (AE titles, addresses and private
        information go); the instance UID follows the dataset's (or is replaced itself)."""
        for tag in list(meta.keys()):
            if meta[tag].keyword not in META_KEEP:
                del meta[tag]
        if "SOPInstanceUID" in ds:
            meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        elif "MediaStorageSOPInstanceUID" in meta:
            meta.MediaStorageSOPInstanceUID = self.new_uid(str(meta.MediaStorageSOPInstanceUID))

    def _record(self, ds: Dataset, study_uid: str, pid: str, offset: int | None) -> None:
        new_study = self.new_uid(study_uid)
        if new_study in self.crosswalk:
            return
        self.crosswalk[new_study] = {
            "new_study_uid": new_study,
            "new_patient_id": self.pseudonym(pid),
            "original_study_uid": study_uid,
            "original_patient_id": str(ds.get("PatientID", "")),
            "original_patient_name": str(ds.get("PatientName", "")),
            "original_accession_number": str(ds.get("AccessionNumber", "")),
            "date_offset_days": "" if offset is None else str(offset),
        }


def _study_and_patient(ds: Dataset) -> tuple[str, str]:
    """The original study UID and the patient key (PatientID, else the study UID)."""
    study_uid = str(ds.get("StudyInstanceUID", "") or "").strip()
    return study_uid, str(ds.get("PatientID", "") or "").strip() or study_uid


IDENTIFYING_KEYWORDS = (
    "PatientID", "AccessionNumber", "OtherPatientIDs", "StudyInstanceUID", "SeriesInstanceUID",
    "SOPInstanceUID", "PatientBirthDate", "InstitutionName",
)  # fmt: skip
NAME_KEYWORDS = ("PatientName", "OtherPatientNames", "PatientBirthName")
MIN_ID_CHARS = 4  # IDs, UIDs, dates: shorter values would match ordinary numbers in free text
MIN_NAME_CHARS = 2  # name parts: "LI", "NG" are whole surnames


@dataclass(frozen=True)
class _Secrets:
    """What the safety scan looks for: whole-word name parts, and ID-like values anywhere."""

    names: frozenset[str]
    ids: frozenset[str]


def _name_parts(value: object) -> set[str]:
    """Family, given and middle name words of a PN value (every component group and value),
    split at anything that is not a letter or digit (SMITH-JONES, O'BRIEN, "VAN DAM");
    prefixes and suffixes (Mr, Dr, Jr, III) identify nobody and are left out."""
    values = value if isinstance(value, MultiValue | list | tuple) else [value]
    parts: set[str] = set()
    for v in values:
        for group in str(v or "").split("="):
            for component in group.split("^")[:3]:
                parts.update(w.upper() for w in re.split(r"[\W_]+", component))
    return {p for p in parts if len(p) >= MIN_NAME_CHARS}


def _identifying_values(ds: Dataset) -> _Secrets:
    """Identifying strings of the input (names, IDs, UIDs), for the final safety scan."""
    ids: set[str] = set()
    for kw in IDENTIFYING_KEYWORDS:
        v = str(ds.get(kw, "") or "").strip()
        if len(v) >= MIN_ID_CHARS:
            ids.add(v.upper())
    names: set[str] = set()
    for kw in NAME_KEYWORDS:
        if kw in ds and ds[kw].value not in (None, ""):
            names |= _name_parts(ds[kw].value)
    return _Secrets(frozenset(names), frozenset(ids))


def _scan_pattern(found: _Secrets) -> re.Pattern[str] | None:
    """One case-insensitive regex: name parts as whole words (not inside a longer word or
    number), IDs anywhere. None when there is nothing to look for."""
    words = sorted(found.names, key=len, reverse=True)
    ids = sorted(found.ids, key=len, reverse=True)
    alts = []
    if words:
        alts.append(r"(?<![^\W_])(?:" + "|".join(map(re.escape, words)) + r")(?![^\W_])")
    if ids:
        alts.append("|".join(map(re.escape, ids)))
    return re.compile("|".join(alts), re.IGNORECASE) if alts else None


def _shift_date(value: str, offset: int) -> str:
    """Shift a DA (``YYYYMMDD``) or the date part of a DT; unparsable values become ''."""
    try:
        day = dt.datetime.strptime(value[:8], "%Y%m%d").date()
    except ValueError:
        return ""
    return (day + dt.timedelta(days=offset)).strftime("%Y%m%d") + value[8:]


def _new_value(elem: DataElement, deid: Deidentifier, offset: int | None):
    """The de-identified value of a kept text element (may be the original)."""
    values = elem.value if elem.VM > 1 else [elem.value]
    if elem.VR == "UI":
        out = [deid.new_uid(str(v)) for v in values]
    elif elem.VR in ("DA", "DT"):
        out = ["" if offset is None else _shift_date(str(v), offset) for v in values if v]
    elif elem.VR == "PN":
        return ""
    else:
        return elem.value
    return out if elem.VM > 1 else (out[0] if out else "")


def _removed(elem: DataElement) -> bool:
    """Whether the profile removes ``elem`` outright (at any nesting level)."""
    tag, kw = elem.tag, elem.keyword
    if tag.is_private or 0x5000 <= tag.group <= 0x50FF or 0x6000 <= tag.group <= 0x60FF:
        return True  # private, curves, overlay planes (data, comments, description, label)
    if kw in REMOVE:
        return True
    if not kw:  # a public tag the dictionary does not know: its content is anyone's guess
        return tag.element != 0  # but a group length is only a length
    if elem.VR in LONG_TEXT_VRS:
        return kw not in KEEP_LONG_TEXT
    return elem.VR in ("LO", "SH") and kw.endswith(FREE_TEXT_SUFFIXES)


def _walk(ds: Dataset, deid: Deidentifier, offset: int | None) -> None:
    """Apply the profile to one dataset level, recursing into sequence items."""
    for tag in list(ds.keys()):
        elem = ds[tag]
        kw = elem.keyword
        if _removed(elem):
            del ds[tag]
        elif kw in EMPTY:
            elem.value = ""
        elif elem.VR == "SQ":
            for item in elem.value:
                _walk(item, deid, offset)
        elif kw == "PatientID":  # nested ones too (another patient's ID in a reference)
            elem.value = deid.pseudonym(str(elem.value or "").strip()) if elem.value else ""
        elif kw in KEEP_UIDS:
            continue
        elif elem.VR in ("UI", "DA", "DT", "PN") and elem.value not in (None, ""):
            elem.value = _new_value(elem, deid, offset)


def _scrub_remaining(ds: Dataset, pattern: re.Pattern[str] | None) -> None:
    """Remove any free-text element that still holds an identifying value (belt and braces).

    Only free-text VRs are read: coded values (CS, DS, IS, UI...) are required by readers and
    a surname can be a substring of one (ONO in MONOCHROME2, MARY in PRIMARY).
    """
    if pattern is None:
        return
    for tag in list(ds.keys()):
        elem = ds[tag]
        if elem.VR == "SQ":
            for item in elem.value:
                _scrub_remaining(item, pattern)
        elif elem.VR in FREE_TEXT_VRS and elem.value not in (None, ""):
            values = elem.value if isinstance(elem.value, MultiValue) else [elem.value]
            if any(pattern.search(str(v)) for v in values):
                log.debug("removed a text element still holding an identifier: %s", elem.keyword)
                del ds[tag]


def _mark(ds: Dataset, dates_shifted: bool) -> None:
    ds.PatientIdentityRemoved = "YES"
    ds.DeidentificationMethod = METHOD
    items = []
    for name in ("basic", "dates") if dates_shifted else ("basic",):
        code = Dataset()
        code.CodeValue, code.CodeMeaning = CODES[name]
        code.CodingSchemeDesignator = "DCM"
        items.append(code)
    ds.DeidentificationMethodCodeSequence = Sequence(items)
    ds.LongitudinalTemporalInformationModified = "MODIFIED" if dates_shifted else "REMOVED"


# --- NIfTI -----------------------------------------------------------------------------------

# NIfTI-1 header text: descrip, aux_file, intent_name, and the unused ANALYZE 7.5 fields
# data_type and db_name (NIfTI-2 has no data_type/db_name; absent keys are skipped).
NIFTI_TEXT_FIELDS = ("descrip", "aux_file", "db_name", "intent_name", "data_type")


def deidentify_nifti_bytes(raw: bytes, name: str) -> bytes:
    """De-identified NIfTI-1/2 single-file bytes: text fields blanked, extensions dropped.

    The image bytes after ``vox_offset`` are copied unchanged. ``name`` only labels errors.
    """
    try:
        size = int.from_bytes(raw[:4], "little")
        if size not in (348, 540):
            size = int.from_bytes(raw[:4], "big")
        klass = nib.Nifti2Header if size == 540 else nib.Nifti1Header
        hdr = klass.from_fileobj(io.BytesIO(raw), check=False)
    except Exception as exc:  # nibabel raises many types for a bad header
        raise DeidError(f"{name}: not a readable NIfTI header ({type(exc).__name__})") from exc
    if hdr.get("magic", b"").tobytes().rstrip(b"\x00") not in (b"n+1", b"n+2"):
        raise DeidError(f"{name}: only single-file NIfTI (.nii/.nii.gz) can be exported")
    data = raw[int(hdr["vox_offset"]) :]
    for key in NIFTI_TEXT_FIELDS:
        if key in hdr:
            hdr[key] = b""
    hdr.extensions.clear()
    vox_offset = hdr.sizeof_hdr + 4  # header + a zeroed extension flag: no extensions
    vox_offset += -vox_offset % 16
    hdr["vox_offset"] = vox_offset
    out = io.BytesIO()
    hdr.write_to(out)
    head = out.getvalue()[: hdr.sizeof_hdr]
    return head + b"\x00" * (vox_offset - len(head)) + data


def deidentify_nifti_data(data: bytes, name: str) -> bytes:
    """De-identified bytes of a .nii or .nii.gz file (gzip in, gzip out)."""
    gz = data[:2] == b"\x1f\x8b"
    if gz:
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError) as exc:
            raise DeidError(f"{name}: corrupt gzip stream") from exc
    out = deidentify_nifti_bytes(data, name)
    return gzip.compress(out, mtime=0) if gz else out


def deidentify_nifti_file(src: Path, dst: Path) -> None:
    """Write a de-identified copy of ``src`` (.nii or .nii.gz) to ``dst`` (same compression)."""
    dst.write_bytes(deidentify_nifti_data(src.read_bytes(), src.name))
