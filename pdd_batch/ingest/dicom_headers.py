"""DICOM headers to the few facts ingestion needs: identity, image kind, and per-frame geometry.

Read with ``stop_before_pixels`` on the driver (discovery), or from a fully read dataset in a
worker (pixel decoding); both go through ``header_from_dataset`` so the two always agree.
Raw UIDs stay inside ``DicomHeader`` (used only for grouping and hashing into keys); they are never
logged or put in messages.
"""

from __future__ import annotations

import math
import struct
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Any, BinaryIO

import pydicom
import pydicom.config
from pydicom.datadict import tag_for_keyword
from pydicom.dataset import Dataset
from pydicom.errors import BytesLengthException, InvalidDicomError

from pdd_batch.ingest.age import age_years
from pdd_batch.ingest.anatomy import body_part_of, view_term
from pdd_batch.ingest.archive_io import BinarySource, IngestLimits, OverLimitError
from pdd_batch.ingest.dicom_tag_scan import (
    MEDIA_SOP_CLASS,
    PIXEL_EXTENT,
    TRANSFER_SYNTAX,
    UNDEFINED,
    HeaderCutShort,
    HeaderIncomplete,
    HeaderTooDeep,
    fragments_problem,
    scan_header,
)

# SOP classes that hold no image to screen, with the reason shown to people.
NON_IMAGE_SOP_CLASSES: dict[str, str] = {
    "1.2.840.10008.1.3.10": "DICOMDIR (media directory, no image)",
    "1.2.840.10008.5.1.4.1.1.104.1": "encapsulated PDF (no image)",
    "1.2.840.10008.5.1.4.1.1.104.2": "encapsulated CDA (no image)",
    "1.2.840.10008.5.1.4.1.1.66.4": "segmentation object (SEG), not an acquired image",
    "1.2.840.10008.5.1.4.1.1.88.59": "key object selection (KOS), no image",
    "1.2.840.10008.5.1.4.1.1.481.3": "RT structure set, no image",
    "1.2.840.10008.5.1.4.1.1.66": "raw data object, no image",
    "1.2.840.10008.5.1.4.1.1.66.1": "spatial registration object, no image",
}
NON_IMAGE_SOP_PREFIXES: dict[str, str] = {
    "1.2.840.10008.5.1.4.1.1.88.": "structured report (SR), no image",
    "1.2.840.10008.5.1.4.1.1.11.": "presentation state (PR), no image",
    "1.2.840.10008.5.1.4.1.1.9.": "waveform, no image",
}
NON_IMAGE_MODALITIES: dict[str, str] = {
    "SR": "structured report (SR), no image",
    "KO": "key object selection (KOS), no image",
    "PR": "presentation state (PR), no image",
    "SEG": "segmentation object (SEG), not an acquired image",
    "DOC": "encapsulated document, no image",
    "RTSTRUCT": "RT structure set, no image",
    "REG": "registration object, no image",
}
# Modalities whose grey-level images the screening model can take.
SUPPORTED_MODALITIES = frozenset(
    {"CT", "MR", "PT", "CR", "DX", "DR", "MG", "XA", "RF", "NM", "OT", "IO", "PX", "RG"}
)
# Defined terms quoted in skip reasons; any other value (free text in a misfilled header could be
# a name) is not echoed.
OTHER_MODALITIES = frozenset(
    "AR ASMT AU BDUS BI BMD CFM DG DMS ECG EEG EMG EOG EPS ES FID GM HC HD IOL IVOCT IVUS KER LEN "
    "LS M3D OAM OCT OP OPM OPT OPTBSV OPTENF OPV OSS PLAN POS RESP RTDOSE RTIMAGE RTINTENT RTPLAN "
    "RTRAD RTRECORD RTSEGANN RWV SM SMR SRF STAIN TEXTUREMAP TG US VA XAPROTOCOL XC AS CD CF CP "
    "CS DD DF DM DS EC FA FS LP MA MS OPR ST VF".split()
)
KNOWN_MODALITIES = SUPPORTED_MODALITIES | set(NON_IMAGE_MODALITIES) | OTHER_MODALITIES
KNOWN_PHOTOMETRIC = frozenset(
    "MONOCHROME1 MONOCHROME2 RGB HSV ARGB CMYK YBR_FULL YBR_FULL_422 YBR_PARTIAL_422 "
    "YBR_PARTIAL_420 YBR_ICT YBR_RCT XYB".split()
) | {"PALETTE COLOR"}


NOT_DICOM = "not a DICOM file (no DICM preamble)"
NO_PIXEL_DATA = "no pixel data (the header describes an image, the file holds none)"
NO_PIXELS = b""  # extent of a data set read to its end without a pixel data element
DEFLATED = "1.2.840.10008.1.2.1.99"
# Transfer syntaxes whose pixel data is stored uncompressed (its length is known from the header).
NATIVE_SYNTAXES = frozenset(
    {"1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.2", "1.2.840.10008.1.2.1.99"}
)


# What pydicom raises on damaged files: bad lengths/VRs, short reads, unknown encodings.
PYDICOM_READ_ERRORS = (
    OSError,
    EOFError,
    ValueError,
    KeyError,
    IndexError,
    TypeError,
    AttributeError,
    NotImplementedError,
    struct.error,
    BytesLengthException,
    OverflowError,  # IS/DS values such as "inf" converted to int
    RecursionError,  # sequences nested deeper than pydicom's recursive reader can go
)


class DicomHeaderError(ValueError):
    """A file that is not DICOM or whose header cannot be parsed (message has no identifiers)."""


@dataclass(frozen=True)
class FrameInfo:
    """One 2D frame of one file, with the geometry needed to place it in a volume.

    Attributes:
        file: archive-relative path of the file.
        frame: 0-based frame index in the file (0 for single-frame objects).
        position: ImagePositionPatient (LPS, mm) or None.
        orientation: ImageOrientationPatient (row cosines, column cosines) or None.
        rows, cols: frame size.
        pixel_spacing: (row spacing, column spacing) in mm, or None.
        temporal: sort key for time points (TemporalPositionIdentifier/Index, AcquisitionNumber).
        instance: InstanceNumber (ties only; never the slice order).
        slope, intercept: rescale to modality units (HU for CT).
        mosaic: Siemens mosaic image (several slices tiled into one frame).
    """

    file: str
    frame: int
    position: tuple[float, float, float] | None
    orientation: tuple[float, ...] | None
    rows: int
    cols: int
    pixel_spacing: tuple[float, float] | None
    temporal: tuple[float, float]
    instance: int
    slope: float = 1.0
    intercept: float = 0.0
    mosaic: bool = False


@dataclass(frozen=True)
class DicomHeader:
    """The facts of one DICOM file. UIDs are for grouping and hashing only; never show them."""

    file: str
    sop_class: str
    modality: str
    study_uid: str
    series_uid: str
    transfer_syntax: str
    photometric: str
    samples_per_pixel: int
    has_image: bool
    frames: tuple[FrameInfo, ...]
    bits_allocated: int = 0
    body_part: str = ""  # vocabulary term (``anatomy``), from BodyPartExamined or descriptions
    view: str = ""  # ViewPosition defined term (radiographs)
    sop_uid: str = ""  # SOP Instance UID: two files holding one are one instance stored twice
    age_years: int | None = field(default=None, repr=False)  # ``ingest.age``; never shown


def _floats(value: Any, n: int) -> tuple[float, ...] | None:
    """Exactly ``n`` finite numbers, or None."""
    try:
        out = tuple(float(v) for v in value)
    except (TypeError, ValueError):
        return None
    return out if len(out) == n and all(math.isfinite(v) for v in out) else None


def _first_item(ds: Dataset, keyword: str) -> Dataset | None:
    seq = ds.get(keyword)
    if seq is None or len(seq) == 0:
        return None
    return seq[0]


def _group_value(groups: list[Dataset | None], macro: str, keyword: str) -> Any:
    """The first value of ``keyword`` found in ``macro`` of the given functional groups."""
    for group in groups:
        if group is None:
            continue
        item = _first_item(group, macro)
        if item is not None and keyword in item:
            return item.get(keyword)
    return None


def _number(value: Any, default: float) -> float:
    """``value`` as a finite float, else ``default`` ("inf", "nan", junk and absent alike)."""
    try:
        out = float(value) if value not in (None, "") else default
    except (TypeError, ValueError):
        return default
    return out if math.isfinite(out) else default


class _Fields:
    """Fast reads of simple top-level values from a dataset.

    String values (UI, CS, DS, IS) are parsed from the raw bytes, skipping pydicom's per-element
    conversion and validation: discovery reads thousands of headers per second through here.
    """

    def __init__(self, ds: Dataset | None = None, raw: dict[int, bytes] | None = None) -> None:
        """From a pydicom dataset, or from the raw little-endian values of ``scan_header``."""
        self.ds, self.raw = ds, raw
        encoding = getattr(ds, "original_encoding", None)  # (implicit VR, little endian)
        self.little = not encoding or encoding[1] is None or bool(encoding[1])

    def _value(self, keyword: str) -> Any:
        if self.raw is not None:
            return self.raw.get(_TAGS[keyword])
        try:
            elem = self.ds.get_item(_TAGS[keyword])  # type: ignore[union-attr]
        except KeyError:
            return None
        return None if elem is None else elem.value

    def strings(self, keyword: str) -> list[str]:
        """All values of a string element ([] when absent or empty)."""
        value = self._value(keyword)
        if value is None:
            return []
        if isinstance(value, bytes | bytearray):
            text = bytes(value).decode("latin-1").strip(" \x00")
            return [p.strip(" \x00") for p in text.split("\\")] if text else []
        if isinstance(value, str):
            return [value] if value else []
        try:
            return [str(v) for v in value]
        except TypeError:
            return [str(value)]

    def text(self, keyword: str) -> str:
        """The (first) string value, or ""."""
        values = self.strings(keyword)
        return values[0] if values else ""

    def floats(self, keyword: str, n: int) -> tuple[float, ...] | None:
        """Exactly ``n`` finite numbers, or None."""
        return _floats(self.strings(keyword), n)

    def number(self, keyword: str, default: float) -> float:
        """The first number, or ``default`` when absent or unparsable."""
        return _number(self.text(keyword), default)

    def ushort(self, keyword: str) -> int:
        """An unsigned short (US) value, 0 when absent."""
        value = self._value(keyword)
        if value is None:
            return 0
        if isinstance(value, bytes | bytearray):
            if len(value) < 2:
                return 0
            return int.from_bytes(bytes(value[:2]), "little" if self.little else "big")
        try:
            return int(value)
        except (TypeError, ValueError):
            return 0


_TAGS = {
    kw: tag_for_keyword(kw)
    for kw in (
        "SOPClassUID", "Modality", "StudyInstanceUID", "SeriesInstanceUID", "Rows", "Columns",
        "BitsAllocated", "SamplesPerPixel", "NumberOfFrames", "ImageType", "ImagePositionPatient",
        "ImageOrientationPatient", "PixelSpacing", "ImagerPixelSpacing", "InstanceNumber",
        "TemporalPositionIdentifier", "AcquisitionNumber", "RescaleSlope", "RescaleIntercept",
        "PhotometricInterpretation", "BodyPartExamined", "ViewPosition", "StudyDescription",
        "SeriesDescription", "ProtocolName", "SOPInstanceUID", "PatientAge", "PatientBirthDate",
        "StudyDate",
    )
}  # fmt: skip
SCAN_TAGS = frozenset(_TAGS.values())
FAST_READ_BYTES = 64 * 1024  # enough for the header of most classic (single-frame) files
FAST_READ_MAX = 4 * 1024 * 1024  # longer headers (big private blocks) go to pydicom


def _classic_frame(f: _Fields, rel: str) -> FrameInfo:
    """Frame 0 of a classic (non-enhanced) object; other frames of it share its geometry."""
    return FrameInfo(
        file=rel,
        frame=0,
        position=f.floats("ImagePositionPatient", 3),  # type: ignore[arg-type]
        orientation=f.floats("ImageOrientationPatient", 6),
        rows=f.ushort("Rows"),
        cols=f.ushort("Columns"),
        pixel_spacing=f.floats("PixelSpacing", 2) or f.floats("ImagerPixelSpacing", 2),  # type: ignore[arg-type]
        temporal=(f.number("TemporalPositionIdentifier", 0.0), f.number("AcquisitionNumber", 0.0)),
        instance=int(f.number("InstanceNumber", 0.0)),
        slope=f.number("RescaleSlope", 1.0),
        intercept=f.number("RescaleIntercept", 0.0),
        mosaic="MOSAIC" in (v.upper() for v in f.strings("ImageType")),
    )


def _enhanced_frames(ds: Dataset, rel: str, n_frames: int) -> tuple[FrameInfo, ...]:
    """Frames of an enhanced multi-frame object from its per-frame / shared functional groups."""
    shared = _first_item(ds, "SharedFunctionalGroupsSequence")
    per_frame = ds.get("PerFrameFunctionalGroupsSequence") or []
    base = _classic_frame(_Fields(ds), rel)
    frames = []
    for i in range(n_frames):
        groups = [per_frame[i] if i < len(per_frame) else None, shared]
        position = _floats(_group_value(groups, "PlanePositionSequence", "ImagePositionPatient"), 3)
        orient = _floats(
            _group_value(groups, "PlaneOrientationSequence", "ImageOrientationPatient"), 6
        )
        spacing = _floats(_group_value(groups, "PixelMeasuresSequence", "PixelSpacing"), 2)
        slope = _group_value(groups, "PixelValueTransformationSequence", "RescaleSlope")
        inter = _group_value(groups, "PixelValueTransformationSequence", "RescaleIntercept")
        t_index = _group_value(groups, "FrameContentSequence", "TemporalPositionIndex")
        frames.append(
            FrameInfo(
                file=rel,
                frame=i,
                position=position or base.position,  # type: ignore[arg-type]
                orientation=orient or base.orientation,
                rows=base.rows,
                cols=base.cols,
                pixel_spacing=spacing or base.pixel_spacing,  # type: ignore[arg-type]
                temporal=(_number(t_index, 0.0), 0.0),
                instance=i,
                slope=_number(slope, base.slope),
                intercept=_number(inter, base.intercept),
            )
        )
    return tuple(frames)


def header_from_dataset(ds: Dataset, rel: str, limits: IngestLimits | None = None) -> DicomHeader:
    """Build a ``DicomHeader`` from a dataset read with or without pixels.

    Raises:
        DicomHeaderError: NumberOfFrames invalid, or frames / voxels over ``limits``.
    """
    meta = getattr(ds, "file_meta", None)
    meta_sop = str(meta.get("MediaStorageSOPClassUID", "")) if meta is not None else ""
    syntax = str(meta.get("TransferSyntaxUID", "")) if meta is not None else ""
    enhanced = "PerFrameFunctionalGroupsSequence" in ds or "SharedFunctionalGroupsSequence" in ds
    f = _Fields(ds=ds)
    return _build_header(f, rel, meta_sop, syntax, ds if enhanced else None, limits)


def header_from_raw(
    raw: dict[int, bytes], rel: str, limits: IngestLimits | None = None
) -> DicomHeader:
    """Build a ``DicomHeader`` from ``dicom_tag_scan.scan_header`` values (classic objects).

    Raises:
        DicomHeaderError: as ``header_from_dataset``.
    """
    meta_sop = raw.get(MEDIA_SOP_CLASS, b"").decode("ascii", "replace").strip(" \x00")
    syntax = raw.get(TRANSFER_SYNTAX, b"").decode("ascii", "replace").strip(" \x00")
    return _build_header(_Fields(raw=raw), rel, meta_sop, syntax, None, limits)


def _frame_count(f: _Fields, limits: IngestLimits) -> int:
    """NumberOfFrames checked before any per-frame object is made (a forged 2**31 or "inf")."""
    text = f.text("NumberOfFrames")
    try:
        value = float(text) if text else 1.0
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value != int(value):
        raise DicomHeaderError("invalid NumberOfFrames value (not a whole number)")
    n = max(1, int(value))
    if n > limits.max_frames_per_file:
        raise DicomHeaderError(
            f"NumberOfFrames {n}, over the cap of {limits.max_frames_per_file} "
            "(--max-frames-per-file)"
        )
    try:
        limits.check_voxels("image", n * f.ushort("Rows") * f.ushort("Columns"))
    except OverLimitError as exc:
        raise DicomHeaderError(str(exc)) from exc
    return n


def _build_header(
    f: _Fields,
    rel: str,
    meta_sop: str,
    syntax: str,
    enhanced: Dataset | None,
    limits: IngestLimits | None,
) -> DicomHeader:
    has_image = bool(f.ushort("Rows") and f.ushort("Columns") and f.ushort("BitsAllocated"))
    n_frames = _frame_count(f, limits or IngestLimits()) if has_image else 0
    if not has_image:
        frames: tuple[FrameInfo, ...] = ()
    elif enhanced is not None:
        frames = _enhanced_frames(enhanced, rel, n_frames)
    else:
        first = _classic_frame(f, rel)
        frames = (first,) + tuple(replace(first, frame=i) for i in range(1, n_frames))
    return DicomHeader(
        file=rel,
        sop_class=f.text("SOPClassUID") or meta_sop,
        modality=f.text("Modality").upper(),
        study_uid=f.text("StudyInstanceUID"),
        series_uid=f.text("SeriesInstanceUID"),
        transfer_syntax=syntax,
        photometric=f.text("PhotometricInterpretation").upper(),
        samples_per_pixel=f.ushort("SamplesPerPixel") or 1,
        has_image=has_image,
        frames=frames,
        bits_allocated=f.ushort("BitsAllocated"),
        body_part=body_part_of(
            f.text("BodyPartExamined"),
            (f.text(k) for k in ("StudyDescription", "SeriesDescription", "ProtocolName")),
        ),
        view=view_term(f.text("ViewPosition")),
        sop_uid=f.text("SOPInstanceUID"),
        age_years=age_years(f.text("PatientAge"), f.text("PatientBirthDate"), f.text("StudyDate")),
    )


@contextmanager
def quiet_pydicom() -> Iterator[None]:
    """Read without pydicom's value-validation warnings: they quote element values, which can be
    patient identifiers, into logs. Values are still read as stored."""
    previous = pydicom.config.settings.reading_validation_mode
    pydicom.config.settings.reading_validation_mode = pydicom.config.IGNORE
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            yield
    finally:
        pydicom.config.settings.reading_validation_mode = previous


def _fast_scan(fh: BinaryIO) -> dict[int, bytes] | None:
    """``scan_header`` on the start of the file, reading more while the header continues; None
    when the file needs pydicom, or its header runs past ``FAST_READ_MAX`` (pydicom reads it).

    Raises:
        HeaderCutShort: the whole file was read and an element's value runs past its end.
    """
    head = fh.read(FAST_READ_BYTES)
    whole = len(head) < FAST_READ_BYTES  # the scan may call an element cut short only then
    while True:
        try:
            return scan_header(head, SCAN_TAGS, complete=whole)
        except HeaderIncomplete:
            if len(head) >= FAST_READ_MAX:
                return None
            more = fh.read(len(head))  # double what we hold
            whole = len(more) < len(head)
            head += more


def read_header(source: BinarySource, rel: str, limits: IngestLimits | None = None) -> DicomHeader:
    """Read one file's header (no pixels).

    Raises:
        DicomHeaderError: not a DICOM file, a header pydicom cannot parse, a value over
            ``limits``, or (when the fast scan sees it) pixel data cut short, empty or shorter
            than the image size.
    """
    limits = limits or IngestLimits()
    try:
        with source.open() as fh, quiet_pydicom():
            raw = _fast_scan(fh)
            if raw is not None:
                header = _checked(header_from_raw(raw, rel, limits))
                whole = fh.tell() >= source.size  # read to the end: no pixel data is none
                extent = raw.get(PIXEL_EXTENT, NO_PIXELS if whole else None)
                cut = _fragments_cut(fh, extent, source.size)
                _check_pixels(header, extent, cut, source.size, limits)
                return header
            fh.seek(0)
            try:
                ds = pydicom.dcmread(fh, stop_before_pixels=True)
            except InvalidDicomError:
                # No preamble: accept only what starts like a DICOM data set (group 0002/0008).
                fh.seek(0)
                if fh.read(2) not in (b"\x02\x00", b"\x08\x00"):
                    raise
                fh.seek(0)
                ds = pydicom.dcmread(fh, stop_before_pixels=True, force=True)
            extent = _extent_here(fh, ds)
            cut = _fragments_cut(fh, extent, source.size)
    except DicomHeaderError:
        raise
    except (HeaderTooDeep, HeaderCutShort) as exc:
        raise DicomHeaderError(str(exc)) from exc
    except InvalidDicomError as exc:
        raise DicomHeaderError(NOT_DICOM) from exc
    except PYDICOM_READ_ERRORS as exc:
        raise DicomHeaderError(f"unreadable DICOM header ({type(exc).__name__})") from exc
    try:
        with quiet_pydicom():
            header = header_from_dataset(ds, rel, limits)
    except DicomHeaderError:
        raise
    except PYDICOM_READ_ERRORS as exc:
        raise DicomHeaderError(f"malformed DICOM header ({type(exc).__name__})") from exc
    header = _checked(header)
    _check_pixels(header, extent, cut, source.size, limits)
    return header


def _extent_here(fh: BinaryIO, ds: Dataset) -> bytes | None:
    """(value start, length) of the pixel data element at ``fh``'s position, where pydicom's
    ``stop_before_pixels`` leaves it; ``NO_PIXELS`` at the end of the file (pydicom read the
    whole data set and found none); None when it cannot tell (deflated data, other bytes)."""
    encoding = getattr(ds, "original_encoding", None)  # (implicit VR, little endian)
    if not encoding or encoding[0] is None or encoding[1] is None:
        return None
    meta = getattr(ds, "file_meta", None)
    if meta is not None and str(meta.get("TransferSyntaxUID", "")) == DEFLATED:
        return None  # pydicom inflated the data set: the file position says nothing
    implicit, little = bool(encoding[0]), bool(encoding[1])
    start = fh.tell()
    head = fh.read(12)
    if not head:
        return NO_PIXELS
    order = "<" if little else ">"
    if len(head) < 8 or struct.unpack(order + "HH", head[:4]) not in _PIXEL_TAG_WORDS:
        return None
    if implicit:
        return struct.pack("<QQ", start + 8, struct.unpack(order + "I", head[4:8])[0])
    if len(head) < 12 or head[4:6] not in (b"OB", b"OW", b"OF", b"OD"):
        return None
    return struct.pack("<QQ", start + 12, struct.unpack(order + "I", head[8:12])[0])


_PIXEL_TAG_WORDS = frozenset({(0x7FE0, 0x0010), (0x7FE0, 0x0008), (0x7FE0, 0x0009)})


def _fragments_cut(fh: BinaryIO, extent: bytes | None, file_size: int) -> str | None:
    """Why encapsulated pixel data at ``extent`` is cut short (None: complete, or not
    encapsulated)."""
    if not extent:
        return None
    start, length = struct.unpack("<QQ", extent)
    return fragments_problem(fh, start, file_size) if length == UNDEFINED else None


def _check_pixels(
    header: DicomHeader,
    extent: bytes | None,
    fragments_cut: str | None,
    file_size: int,
    limits: IngestLimits,
) -> None:
    """The pixel data the header promises is in the file: present, (value start, length)
    within the file size and long enough for the image, encapsulated fragments complete.
    ``extent`` None: where the pixel data lies is not known here (the worker checks it).

    Raises:
        DicomHeaderError: no pixel data, or pixel data cut short, empty or too short.
    """
    if extent is None or not header.has_image:
        return
    if extent == NO_PIXELS:
        if skip_reason(header) is None:  # an image to screen (a non-image is skipped anyway)
            raise DicomHeaderError(NO_PIXEL_DATA)
        return
    start, length = struct.unpack("<QQ", extent)
    if length == UNDEFINED:  # encapsulated (compressed) frames: bound the expansion
        if fragments_cut:
            raise DicomHeaderError(fragments_cut)
        try:
            limits.check_ratio("compressed image", image_bytes(header), file_size - start)
        except OverLimitError as exc:
            raise DicomHeaderError(str(exc)) from exc
        return
    if start + length > file_size:
        raise DicomHeaderError(
            f"truncated file: pixel data cut short ({file_size - start} of {length} bytes)"
        )
    problem = pixel_length_problem(header, length)
    if problem:
        raise DicomHeaderError(problem)


def image_bytes(header: DicomHeader) -> int:
    """Bytes of the header's frames stored uncompressed (BitsAllocated 1: packed bits)."""
    if not header.frames:
        return 0
    f = header.frames[0]
    n_samples = len(header.frames) * f.rows * f.cols * header.samples_per_pixel
    bits = header.bits_allocated
    return (n_samples + 7) // 8 if bits == 1 else n_samples * ((bits + 7) // 8)


def pixel_length_problem(header: DicomHeader, length: int) -> str | None:
    """Why native pixel data of ``length`` bytes cannot be this header's image (None: it can).

    Longer data is accepted (pydicom reads the image from its start, as for odd-length padding).
    """
    if length == 0:
        return "empty pixel data (no image bytes)"
    if header.transfer_syntax in NATIVE_SYNTAXES and length < image_bytes(header):
        return f"pixel data shorter than the image ({length} of {image_bytes(header)} bytes)"
    return None


def _checked(header: DicomHeader) -> DicomHeader:
    if not header.sop_class and not header.modality and not header.has_image:
        raise DicomHeaderError("corrupt DICOM data set (no SOP class, modality or image)")
    return header


def transfer_syntax_name(uid: str) -> str:
    """Human name of a transfer syntax UID (these UIDs are standard, not identifying)."""
    try:
        return pydicom.uid.UID(uid).name if uid else "unknown"
    except (ValueError, TypeError):
        return uid


def skip_reason(header: DicomHeader) -> str | None:
    """Why a DICOM file is not screened (non-image, unsupported modality, colour); None = use it."""
    if header.sop_class in NON_IMAGE_SOP_CLASSES:
        return NON_IMAGE_SOP_CLASSES[header.sop_class]
    for prefix, reason in NON_IMAGE_SOP_PREFIXES.items():
        if header.sop_class.startswith(prefix):
            return reason
    if header.modality in NON_IMAGE_MODALITIES:
        return NON_IMAGE_MODALITIES[header.modality]
    if not header.has_image:
        return "DICOM object without image pixels"
    if header.modality not in SUPPORTED_MODALITIES:
        shown = header.modality if header.modality in KNOWN_MODALITIES else "(not a defined term)"
        return f"unsupported modality {shown if header.modality else '(none)'}"
    if header.samples_per_pixel != 1 or not header.photometric.startswith("MONOCHROME"):
        shown = header.photometric if header.photometric in KNOWN_PHOTOMETRIC else "unknown"
        return f"colour image ({shown}) not supported"
    return None
