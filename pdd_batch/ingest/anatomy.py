"""Body part and view facts from headers, in a fixed vocabulary (never free text).

``BodyPartExamined`` is a DICOM defined term (CID 4031), but descriptions are free text that can
hold anything, a name included. So a value is kept only when it is a term of the vocabulary
below; descriptions only contribute the vocabulary words they contain, and only when they name
exactly one region. Nothing else from a header ever leaves this module.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

# Region groups used for matching a series to a model scope: a HEAD model covers BRAIN series.
REGIONS: dict[str, frozenset[str]] = {
    "HEAD": frozenset({"HEAD", "BRAIN", "SKULL", "CRANIUM", "NEURO", "CEREBRUM"}),
    "CHEST": frozenset({"CHEST", "THORAX", "LUNG", "LUNGS", "THORACIC"}),
    "ABDOMEN": frozenset({"ABDOMEN", "ABD", "LIVER", "KIDNEY", "PANCREAS"}),
    "PELVIS": frozenset({"PELVIS", "HIP", "PROSTATE", "BLADDER"}),
    "SPINE": frozenset({"SPINE", "CSPINE", "TSPINE", "LSPINE", "SSPINE", "COCCYX", "SACRUM"}),
    "NECK": frozenset({"NECK", "THYROID", "LARYNX"}),
    "BREAST": frozenset({"BREAST"}),
    "HEART": frozenset({"HEART", "CARDIAC", "CORONARY"}),
    "EXTREMITY": frozenset(
        {"EXTREMITY", "ARM", "HAND", "WRIST", "ELBOW", "SHOULDER", "LEG", "KNEE", "ANKLE", "FOOT"}
    ),
    "WHOLEBODY": frozenset({"WHOLEBODY"}),
}
TERMS: dict[str, str] = {term: region for region, terms in REGIONS.items() for term in terms}
# Multi-word defined terms written with a space or underscore in headers.
_JOINED = {"WHOLE BODY": "WHOLEBODY", "C SPINE": "CSPINE", "T SPINE": "TSPINE", "L SPINE": "LSPINE"}
# ViewPosition defined terms (radiographs).
VIEWS = frozenset({"AP", "PA", "LL", "RL", "LAT", "LLD", "RLD", "LPO", "RPO", "LAO", "RAO"})
_WORD = re.compile(r"[A-Z]+")


def region_of(term: str) -> str:
    """The region group of a vocabulary term ("BRAIN" -> "HEAD"); "" when not a term."""
    return TERMS.get(term.upper(), "")


def _normalised(value: str) -> str:
    text = " ".join(value.upper().replace("_", " ").replace("-", " ").split())
    return _JOINED.get(text, text.replace(" ", ""))


def body_part_term(value: str) -> str:
    """``BodyPartExamined`` as a vocabulary term, or "" (unknown terms are never echoed)."""
    term = _normalised(value or "")
    return term if term in TERMS else ""


def body_part_from_text(texts: Iterable[str]) -> str:
    """The one region that description words name ("CT HEAD W/O" -> "HEAD"); "" when none or
    when the words name several regions (ambiguous)."""
    found = set()
    for text in texts:
        for word in _WORD.findall((text or "").upper()):
            if word in TERMS:
                found.add(TERMS[word])
    return found.pop() if len(found) == 1 else ""


def body_part_of(body_part_examined: str, descriptions: Iterable[str] = ()) -> str:
    """A series' body part: the defined term when the header has one, else the region named by
    its study/series descriptions or protocol, else ""."""
    return body_part_term(body_part_examined) or body_part_from_text(descriptions)


def view_term(value: str) -> str:
    """``ViewPosition`` as a defined term ("PA", "AP", "LL"...), or ""."""
    term = (value or "").strip().upper()
    return term if term in VIEWS else ""
