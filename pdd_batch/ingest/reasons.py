"""One scrubber for every error reason the project stores or shows (error rows, manifest, CLI).

A reason names what went wrong, never whom: absolute paths, raw byte values and instance UIDs are
masked (standard DICOM UIDs such as SOP classes and transfer syntaxes are kept: they identify no
one), whitespace is folded to one line and the length is bounded.
"""

from __future__ import annotations

import re

MAX_REASON_CHARS = 300
ABS_PATH = re.compile(r"(?<![\w.])/[^\s'\"]+")
BYTES_LITERAL = re.compile(r"b'(?:[^'\\]|\\.)*'|b\"(?:[^\"\\]|\\.)*\"")
UID_LIKE = re.compile(r"\b\d+(?:\.\d+){3,}\b")
DICOM_ROOT = "1.2.840.10008."  # standard UIDs (SOP classes, transfer syntaxes)


def scrub_reason(text: str, limit: int = MAX_REASON_CHARS, *, keep_paths: bool = False) -> str:
    """``text`` safe to store: raw bytes, absolute paths and instance UIDs masked, one line,
    at most ``limit`` characters.

    ``keep_paths`` is for a whole run's failure, whose reason names the operator's own files
    (checkpoint, teacher weights) that must be fixed; a reason about an input file never keeps them.
    """
    text = " ".join(str(text).split())
    text = BYTES_LITERAL.sub("<bytes>", text)  # raw element values: could be anything
    if not keep_paths:
        text = ABS_PATH.sub("<path>", text)
    text = UID_LIKE.sub(lambda m: m[0] if m[0].startswith(DICOM_ROOT) else "<uid>", text)
    return text[:limit]


def exception_reason(exc: BaseException, limit: int = 160) -> str:
    """``Name: message`` of an exception, scrubbed (``scrub_reason``); the bare name when the
    message is empty."""
    text = scrub_reason(str(exc), limit)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
