"""A fast scan of the top-level header of common DICOM files, for discovery.

Most archive files are Part 10 files with an Explicit VR Little Endian data set (uncompressed, or
any encapsulated JPEG / JPEG-LS / JPEG 2000 / RLE syntax). For those, this scanner walks the
elements up to the pixel data and returns the raw bytes of the few tags discovery needs, several
times faster than a full ``pydicom.dcmread``. Anything unusual (no preamble, implicit VR, big
endian, deflate, enhanced multi-frame functional groups, UN of undefined length, a header longer
than the bytes read, malformed lengths) returns None and the caller uses pydicom instead, so the
result is always the same as pydicom's; a parity test checks it.
"""

from __future__ import annotations

import struct
from typing import BinaryIO

PIXEL_DATA = 0x7FE00010
PIXEL_TAGS = frozenset({PIXEL_DATA, 0x7FE00008, 0x7FE00009})  # (float, double float) pixel data
PIXEL_EXTENT = -1  # not a tag: key of the pixel data's (value start, length) in scan_header's dict
TRANSFER_SYNTAX = 0x00020010
MEDIA_SOP_CLASS = 0x00020002
FUNCTIONAL_GROUPS = (0x52009229, 0x52009230)  # shared / per-frame: enhanced objects
ITEM, ITEM_END, SEQ_END = 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD
UNDEFINED = 0xFFFFFFFF
MAX_DEPTH = 64  # nested sequence levels; real headers use a handful
LONG_VRS = frozenset(
    {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"}
)
# Data sets encoded Explicit VR Little Endian (native or encapsulated pixel data).
EXPLICIT_LE_SYNTAXES = frozenset(
    {
        "1.2.840.10008.1.2.1",  # Explicit VR Little Endian
        "1.2.840.10008.1.2.4.50",  # JPEG Baseline
        "1.2.840.10008.1.2.4.51",  # JPEG Extended
        "1.2.840.10008.1.2.4.57",  # JPEG Lossless
        "1.2.840.10008.1.2.4.70",  # JPEG Lossless SV1
        "1.2.840.10008.1.2.4.80",  # JPEG-LS Lossless
        "1.2.840.10008.1.2.4.81",  # JPEG-LS Near-Lossless
        "1.2.840.10008.1.2.4.90",  # JPEG 2000 Lossless
        "1.2.840.10008.1.2.4.91",  # JPEG 2000
        "1.2.840.10008.1.2.5",  # RLE Lossless
    }
)
_HEAD = struct.Struct("<HH2s")
_U16 = struct.Struct("<H")
_U32 = struct.Struct("<I")
_TAG_LEN = struct.Struct("<II")
_EXTENT = struct.Struct("<QQ")


class _NeedFullParser(Exception):
    """Internal: this file is not a plain case; use pydicom."""


class _OutOfBytes(Exception):
    """Internal: the header continues past the bytes given."""


class HeaderTooDeep(ValueError):
    """Sequences nested deeper than any real header (a forged file): not readable."""


class HeaderIncomplete(Exception):
    """The header continues past the bytes given: call again with more of the file."""


class HeaderCutShort(ValueError):
    """The whole file was given and an element's value runs past its end: a truncated file."""


class _ValuePastEnd(_OutOfBytes):
    """Internal: a complete element header whose value runs past the bytes given."""


def _element(data: bytes, pos: int) -> tuple[int, int, int]:
    """(tag, value start, value length) of the explicit-VR LE element at ``pos``."""
    if pos + 8 > len(data):
        raise _OutOfBytes
    group, elem, vr = _HEAD.unpack_from(data, pos)
    tag = (group << 16) | elem
    if tag in (ITEM, ITEM_END, SEQ_END):
        return tag, pos + 8, _U32.unpack_from(data, pos + 4)[0]
    if not (65 <= vr[0] <= 90 and 65 <= vr[1] <= 90):
        raise _NeedFullParser  # not an explicit VR
    if vr in LONG_VRS:
        if pos + 12 > len(data):
            raise _OutOfBytes
        length = _U32.unpack_from(data, pos + 8)[0]
        if length == UNDEFINED and vr != b"SQ" and tag not in PIXEL_TAGS:
            raise _NeedFullParser  # UN/OB of undefined length: implicit VR inside
        return tag, pos + 12, length
    return tag, pos + 8, _U16.unpack_from(data, pos + 6)[0]


def _skip_sequence(data: bytes, pos: int) -> int:
    """Position after an undefined-length sequence whose first item starts at ``pos``.

    Iterative (a stack of open sequences/items, not recursion), so a forged file of thousands of
    nested sequences cannot exhaust Python's stack; nesting deeper than ``MAX_DEPTH`` is
    ``HeaderTooDeep``.
    """
    stack = ["seq"]  # open undefined-length containers, innermost last
    while stack:
        if len(stack) > 2 * MAX_DEPTH:
            raise HeaderTooDeep(f"DICOM sequences nested deeper than {MAX_DEPTH} levels")
        if stack[-1] == "seq":
            if pos + 8 > len(data):
                raise _OutOfBytes
            tag, length = _TAG_LEN.unpack_from(data, pos)
            tag = ((tag & 0xFFFF) << 16) | (tag >> 16)  # (group, element) little-endian words
            pos += 8
            if tag == SEQ_END:
                stack.pop()
            elif tag != ITEM:
                raise _NeedFullParser
            elif length == UNDEFINED:
                stack.append("item")
            else:
                pos += length
            continue
        tag, start, length = _element(data, pos)  # inside an undefined-length item
        if tag == ITEM_END:
            stack.pop()
            pos = start
        elif length == UNDEFINED:
            stack.append("seq")
            pos = start
        else:
            pos = start + length
    return pos


def _meta(data: bytes) -> tuple[dict[int, bytes], int]:
    """File meta group (always explicit VR LE): values and the position after it."""
    values: dict[int, bytes] = {}
    pos = 132
    while pos + 8 <= len(data) and _U16.unpack_from(data, pos)[0] == 0x0002:
        tag, start, length = _element(data, pos)
        if length == UNDEFINED:
            raise _NeedFullParser
        if start + length > len(data):
            raise _OutOfBytes
        values[tag] = data[start : start + length]
        pos = start + length
    return values, pos


def scan_header(data: bytes, wanted: frozenset[int], complete: bool) -> dict[int, bytes] | None:
    """Raw values of the ``wanted`` top-level tags (and the transfer syntax / SOP class of the
    file meta), or None when the file needs pydicom. Under ``PIXEL_EXTENT``, when the file has
    pixel data (integer, float or double float): its value start and length (``UNDEFINED`` when
    encapsulated), as ``<QQ``.

    Args:
        data: the first bytes of the file (at least up to the pixel data to succeed).
        wanted: tags as ``(group << 16) | element`` integers.
        complete: ``data`` is the whole file (so ending without pixel data is a real ending).

    Raises:
        HeaderIncomplete: ``complete`` is False and the header continues past ``data``.
        HeaderCutShort: ``complete`` is True and an element's value runs past the end.
    """
    if len(data) < 140 or data[128:132] != b"DICM":
        return None
    try:
        meta, pos = _meta(data)
        syntax = meta.get(TRANSFER_SYNTAX, b"").decode("ascii", "replace").strip("\x00 ")
        if syntax not in EXPLICIT_LE_SYNTAXES:
            return None
        out = {k: v for k, v in meta.items() if k in (TRANSFER_SYNTAX, MEDIA_SOP_CLASS)}
        while pos < len(data):
            tag, start, length = _element(data, pos)
            if tag in PIXEL_TAGS:
                out[PIXEL_EXTENT] = _EXTENT.pack(start, length)
                return out
            if tag in FUNCTIONAL_GROUPS or tag in (ITEM, ITEM_END, SEQ_END):
                return None
            if length == UNDEFINED:
                pos = _skip_sequence(data, start)
                continue
            if start + length > len(data):
                raise _ValuePastEnd
            if tag in wanted:
                out[tag] = data[start : start + length]
            pos = start + length
        if not complete:
            raise _OutOfBytes
        return out  # the whole file, no pixel data: SR, KOS, PDF, DICOMDIR ...
    except _NeedFullParser:
        return None
    except _ValuePastEnd:
        if complete:
            raise HeaderCutShort("truncated file: data set cut short") from None
        raise HeaderIncomplete from None
    except _OutOfBytes:
        if complete:
            return None  # cut inside an element's tag or length: pydicom decides what it is
        raise HeaderIncomplete from None


CUT_SHORT = "truncated file: compressed pixel data cut short"
MAX_FRAGMENT_ITEMS = 100_000  # more fragments than any real file holds: not walked further


def fragments_problem(fh: BinaryIO, start: int, file_size: int) -> str | None:
    """Why the encapsulated pixel data whose first item starts at ``start`` is cut short (None:
    every fragment item ends inside the file).

    Walks the item headers only (a seek and an 8-byte read per fragment). A file that ends at an
    item boundary without the sequence delimiter is cut short too (pydicom then drops the pixel
    data); anything other than an item or the delimiter is left to the decoder.
    """
    pos = start
    for _ in range(MAX_FRAGMENT_ITEMS):
        fh.seek(pos)
        head = fh.read(8)
        if len(head) < 8:
            return CUT_SHORT
        tag, length = _TAG_LEN.unpack(head)
        tag = ((tag & 0xFFFF) << 16) | (tag >> 16)  # (group, element) little-endian words
        if tag != ITEM or length == UNDEFINED:
            return None
        pos += 8 + length
        if pos > file_size:
            return CUT_SHORT
    return None
