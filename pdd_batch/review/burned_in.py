"""Which DICOM files may show burned-in text: de-identification never touches pixels.

A file whose pixels may show names, IDs or dates (text burned into the image, a screen capture,
a photograph of a document) is not de-identified by cleaning its header; ``pdd-batch export``
withholds it unless ``--allow-burned-in`` is given, and the overlays built from it inherit the
flag (never NO when the source does not say).
"""

from __future__ import annotations

import enum

from pydicom.dataset import Dataset
from pydicom.multival import MultiValue

# Modalities whose pixels often carry burned-in text (names, IDs, dates) or a face/document.
HIGH_RISK_MODALITIES = frozenset("OT XA RF DX CR MG US SC IO PX XC ES GM DOC".split())
# Secondary Capture Image Storage and its multi-frame variants (screen captures).
SECONDARY_CAPTURE_CLASSES = frozenset(
    "1.2.840.10008.5.1.4.1.1.7" + suffix for suffix in ("", ".1", ".2", ".3", ".4")
)


class BurnedIn(enum.Enum):
    """What a file's header says about burned-in text in its pixels."""

    YES = "BurnedInAnnotation=YES"
    NO = "BurnedInAnnotation=NO"
    UNKNOWN_HIGH_RISK = "BurnedInAnnotation absent on a high-risk modality or a screen capture"
    UNKNOWN = "BurnedInAnnotation absent"

    @property
    def possible(self) -> bool:
        """Whether the pixels may show burned-in text (export withholds these by default)."""
        return self in (BurnedIn.YES, BurnedIn.UNKNOWN_HIGH_RISK)


def burned_in_risk(ds: Dataset) -> BurnedIn:
    """Classify ``ds`` by BurnedInAnnotation, its modality and whether it is a screen capture.

    An explicit YES or NO is trusted. Absent (or any other value) is a risk on the modalities
    of ``HIGH_RISK_MODALITIES``, on an empty modality, and on screen captures: a Secondary
    Capture SOP class or an ImageType value containing SCREEN (SCREEN SAVE, SCREEN SHOT).
    DERIVED\\SECONDARY alone is not a screen capture (CT/MR reformats carry it).
    """
    flag = str(ds.get("BurnedInAnnotation", "") or "").strip().upper()
    if flag in ("YES", "NO"):
        return BurnedIn[flag]
    modality = str(ds.get("Modality", "") or "").strip().upper()
    sop_class = str(ds.get("SOPClassUID", "") or "").strip()
    image_type = ds.get("ImageType", None) or []
    image_type = image_type if isinstance(image_type, MultiValue | list) else [image_type]
    screen = any("SCREEN" in str(v).upper() for v in image_type)
    if not modality or modality in HIGH_RISK_MODALITIES or screen:
        return BurnedIn.UNKNOWN_HIGH_RISK
    if sop_class in SECONDARY_CAPTURE_CLASSES:
        return BurnedIn.UNKNOWN_HIGH_RISK
    return BurnedIn.UNKNOWN


def inherited_flag(sources: list[BurnedIn]) -> str | None:
    """BurnedInAnnotation for an image derived from ``sources``' pixels (an overlay).

    YES when any source may show burned-in text, NO only when every source says NO, else
    None: the attribute is left out (unknown stays unknown; never NO when unknown).
    """
    if any(s.possible for s in sources):
        return "YES"
    if sources and all(s is BurnedIn.NO for s in sources):
        return "NO"
    return None
