"""A hostile archive: every malformed, forged or oversized input the readers must survive.

``build_hostile_archive(root)`` writes, under ``root`` (and a sibling folder for link targets):

* a good CT series of 30 instances (``ct_good/``) plus three bad copies of its instances with the
  same series UID in other folders that sort first (so a reader that trusts them loses the good
  copy): one cut mid-pixel-data, one with empty pixel data, one with pixel data shorter than the
  image (``a_partial/``, ``a_zero_pixels/``, ``a_wrong_length/``); and a 31st instance of the
  series whose RLE payload cannot be decoded, which only the read stage can find
  (``ct_good_extra/``);
* IS values "inf": NumberOfFrames (unusable) and InstanceNumber (harmless: the image is used);
* ~500 nested undefined-length sequences before the pixel data (a stack-depth attack);
* forged sizes: NumberOfFrames 2**31, a series of Rows = Columns = 65535 instances, a gzip
  "bomb" .nii.gz (128 MiB of zeros in ~130 kB, gzip size field consistent);
* .zip members with a bad CRC, an "encrypted" flag, and a forged 4 GiB declared size; a .tar.gz
  cut inside its second member; a .tgz holding 64 MiB of zeros (over the ratio cap on the tar's
  output) and a .nii.gz of 64 MiB of zeros padded with random bytes after its gzip stream;
* links to a file and to a folder outside the archive root;
* the usual junk: a corrupt DICOM, a zero-byte file, an SR object, a README.

It returns what it wrote, so tests (and a later end-to-end privacy test) can check that every
file is accounted for without hard-coding a run's output.
"""

from __future__ import annotations

import gzip
import io
import struct
import tarfile
import warnings
import zipfile
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pydicom
from dicom_factory import (
    FAKE_PATIENT_ID,
    FAKE_PATIENT_NAME,
    write_corrupt_dicom,
    write_ct_series,
    write_non_image,
    write_text,
    write_zero_byte,
)
from pydicom.dataelem import RawDataElement
from pydicom.encaps import encapsulate
from pydicom.sequence import Sequence as DicomSequence
from pydicom.tag import Tag
from pydicom.uid import RLELossless, generate_uid

GOOD_SLICES = 30
FORGED_ROWS_SLICES = 12
DEEP_LEVELS = 500
BOMB_SHAPE = (512, 512, 512)  # uint8 zeros: 128 MiB inflated (512 MiB as float32)
BOMB_BYTES = 64 * 2**20  # zeros: gzip packs them ~1000x, over the default ratio cap of 800x
_TAR_MODES = {"tar.gz": "w:gz", "tgz": "w:gz", "tar.bz2": "w:bz2", "tar.xz": "w:xz", "tar": "w"}


def _raw_is(ds: pydicom.Dataset, tag: int, text: bytes) -> None:
    """Set an IS element to bytes pydicom would refuse to write as a value (e.g. b"inf ")."""
    ds[tag] = RawDataElement(Tag(tag), "IS", len(text), text, 0, False, True)


def _variant(src: Path, dest: Path, edit: Any) -> Path:
    """A copy of the DICOM file ``src`` at ``dest`` with ``edit(ds)`` applied."""
    ds = pydicom.dcmread(src)
    edit(ds)
    dest.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(dest, enforce_file_format=True)
    return dest


def _cut_mid_pixels(src: Path, dest: Path) -> Path:
    """A copy of ``src`` cut halfway through its pixel data (a partly transferred file)."""
    raw = src.read_bytes()
    n_pixels = len(pydicom.dcmread(src).PixelData)
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_bytes(raw[: len(raw) - n_pixels // 2])
    return dest


def _deep_sequences(src: Path, dest: Path, levels: int) -> Path:
    """A copy of ``src`` whose ReferencedImageSequence nests ``levels`` undefined-length items."""
    ds = pydicom.dcmread(src)
    ds.ReferencedImageSequence = DicomSequence([])
    dest.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(dest, enforce_file_format=True)
    empty = b"\x08\x00\x40\x11SQ\x00\x00\x00\x00\x00\x00"  # (0008,1140) SQ, length 0
    opening = b"\x08\x00\x40\x11SQ\x00\x00\xff\xff\xff\xff" + b"\xfe\xff\x00\xe0\xff\xff\xff\xff"
    closing = b"\xfe\xff\x0d\xe0\x00\x00\x00\x00" + b"\xfe\xff\xdd\xe0\x00\x00\x00\x00"
    raw = dest.read_bytes()
    assert raw.count(empty) == 1
    dest.write_bytes(raw.replace(empty, opening * levels + closing * levels))
    return dest


def _gzip_bomb(path: Path) -> Path:
    """A .nii.gz whose header promises ``BOMB_SHAPE`` uint8 voxels of zeros (consistent ISIZE)."""
    header = nib.Nifti1Header()
    header.set_data_shape(BOMB_SHAPE)
    header.set_data_dtype(np.uint8)
    header.set_sform(np.eye(4), code=1)
    header.set_qform(np.eye(4), code=1)
    chunk = bytes(1 << 22)
    n_bytes = int(np.prod(BOMB_SHAPE))
    path.parent.mkdir(parents=True, exist_ok=True)
    with gzip.open(path, "wb", compresslevel=9) as fh:
        fh.write(header.binaryblock + b"\x00" * 4)  # 348-byte header + empty extension flag
        for _ in range(n_bytes // len(chunk)):
            fh.write(chunk)
    return path


class _Zeros(io.RawIOBase):
    """``n`` zero bytes, read in pieces."""

    def __init__(self, n: int) -> None:
        self.left = n

    def readable(self) -> bool:
        return True

    def readinto(self, buf: memoryview) -> int:  # type: ignore[override]
        k = min(len(buf), self.left)
        buf[:k] = bytes(k)
        self.left -= k
        return k


def ratio_tar(path: Path, members: list[tuple[str, bytes | int]]) -> Path:
    """A compressed tar of ``members``: (name, bytes) or (name, number of zero bytes)."""
    mode = _TAR_MODES[path.name.split(".", 1)[1]]
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, mode) as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = data if isinstance(data, int) else len(data)
            tf.addfile(info, _Zeros(data) if isinstance(data, int) else io.BytesIO(data))
    return path


def padded_nifti_bomb(path: Path, tail: bytes, tail_as_member: bool) -> Path:
    """A .nii.gz whose header promises ``BOMB_BYTES`` uint8 zeros, in one gzip member, then
    ``tail``: raw bytes after the stream or a gzip member of its own past the promised size."""
    header = nib.Nifti1Header()
    header.set_data_shape((256, 256, BOMB_BYTES // 256 // 256))
    header.set_data_dtype(np.uint8)
    header.set_sform(np.eye(4), code=1)
    chunk = bytes(1 << 22)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as raw:
        with gzip.GzipFile(fileobj=raw, mode="wb", compresslevel=9) as fh:
            fh.write(header.binaryblock + b"\x00" * 4)  # 348-byte header + no extension
            for _ in range(BOMB_BYTES // len(chunk)):
                fh.write(chunk)
        raw.write(gzip.compress(tail, compresslevel=0) if tail_as_member else tail)
    return path


def _stored_zip(path: Path, name: str, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as zf:
        zf.writestr(name, data)
    return path


def _patch_zip(path: Path, *, flip_data_byte: bool = False, encrypted: bool = False,
               declared_size: int | None = None) -> Path:  # fmt: skip
    """Damage a one-member stored zip: a data byte (bad CRC), the encryption flag, or the size
    declared in the local header and central directory."""
    raw = bytearray(path.read_bytes())
    local, central = raw.find(b"PK\x03\x04"), raw.rfind(b"PK\x01\x02")
    if flip_data_byte:
        name_len, extra_len = struct.unpack_from("<HH", raw, local + 26)
        size = struct.unpack_from("<I", raw, local + 18)[0]
        raw[local + 30 + name_len + extra_len + size - 7] ^= 0xFF
    if encrypted:
        for at in (local + 6, central + 8):
            raw[at] |= 0x01
    if declared_size is not None:
        struct.pack_into("<I", raw, local + 22, declared_size)
        struct.pack_into("<I", raw, central + 24, declared_size)
    path.write_bytes(bytes(raw))
    return path


def _cut_tar_gz(path: Path, members: list[tuple[str, bytes]]) -> Path:
    """A .tar.gz of ``members`` cut inside its second member (the last one is never reached)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    raw = buf.getvalue()
    path.write_bytes(raw[: int(len(raw) * 0.6)])
    return path


def _ct_instance(directory: Path, seed: int, rows: int = 16, cols: int = 16) -> Path:
    (path,) = write_ct_series(directory, n_slices=1, rows=rows, cols=cols, seed=seed)
    return path


def _bad_copies(root: Path, good: list[Path]) -> dict[str, str]:
    """The item-13 cases: bad copies of good instances (same UIDs) in folders that sort first."""

    def empty_pixels(ds: pydicom.Dataset) -> None:
        ds.PixelData = b""

    def short_pixels(ds: pydicom.Dataset) -> None:
        ds.PixelData = ds.PixelData[:-100]

    made = [
        _cut_mid_pixels(good[4], root / "a_partial" / good[4].name),
        _variant(good[9], root / "a_zero_pixels" / good[9].name, empty_pixels),
        _variant(good[19], root / "a_wrong_length" / good[19].name, short_pixels),
    ]
    return {p.relative_to(root).as_posix(): "failed" for p in made}


def _undecodable_extra(root: Path, last: Path) -> Path:
    """One more slice of ``last``'s series (next position) whose RLE payload is garbage: its
    header is fine, so discovery uses it; decoding fails in the read stage."""

    def garbage_rle(ds: pydicom.Dataset) -> None:
        step = float(ds.SliceThickness)
        ds.ImagePositionPatient = [*ds.ImagePositionPatient[:2], ds.ImagePositionPatient[2] + step]
        ds.InstanceNumber = int(ds.InstanceNumber) + 1
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()  # its own
        ds.file_meta.TransferSyntaxUID = RLELossless
        header = (2).to_bytes(4, "little") + (64).to_bytes(4, "little") + (80).to_bytes(4, "little")
        ds.PixelData = encapsulate([header + bytes(52) + bytes([5]) * 40])
        ds["PixelData"].VR = "OB"
        ds["PixelData"].is_undefined_length = True

    name = f"IM{int(pydicom.dcmread(last).InstanceNumber) + 1:04d}.dcm"
    return _variant(last, root / "ct_good_extra" / name, garbage_rle)


def _forged(root: Path, template: Path) -> dict[str, str]:
    """IS "inf", deep sequences, NumberOfFrames 2**31 and a 65535 x 65535 series."""
    out: dict[str, str] = {}

    def inf_frames(ds: pydicom.Dataset) -> None:
        _raw_is(ds, 0x00280008, b"inf ")

    def huge_frames(ds: pydicom.Dataset) -> None:
        _raw_is(ds, 0x00280008, b"2147483648")

    out[_rel(root, _variant(template, root / "forged" / "inf_frames.dcm", inf_frames))] = "failed"
    out[_rel(root, _variant(template, root / "forged" / "frames_2g.dcm", huge_frames))] = "failed"
    inf_instance = _ct_instance(root / "inf_instance", seed=31)
    _variant(inf_instance, inf_instance, lambda ds: _raw_is(ds, 0x00200013, b"inf "))
    out[_rel(root, inf_instance)] = "used"
    deep = _deep_sequences(template, root / "forged" / "deep_sequences.dcm", DEEP_LEVELS)
    out[_rel(root, deep)] = "failed"
    for p in write_ct_series(root / "forged_rows", n_slices=FORGED_ROWS_SLICES, seed=41):
        _variant(p, p, lambda ds: ds.update({"Rows": 65535, "Columns": 65535}))
        out[_rel(root, p)] = "failed"
    out[_rel(root, _gzip_bomb(root / "nifti" / "bomb.nii.gz"))] = "failed"
    return out


def _archives(root: Path, template: Path) -> dict[str, str]:
    """Damaged .zip members and a truncated .tar.gz (discover with ``open_archives=True``)."""
    data = template.read_bytes()
    out = {}
    for name, damage in {
        "bad_crc.zip": {"flip_data_byte": True},
        "encrypted.zip": {"encrypted": True},
        "huge_member.zip": {"declared_size": 0xFFFFFFF0},
    }.items():
        _patch_zip(_stored_zip(root / "zips" / name, "IM0001.dcm", data), **damage)
        out[f"zips/{name}!IM0001.dcm"] = "failed"
    noise = np.random.default_rng(5).integers(0, 4096, 128 * 128, dtype=np.uint16).tobytes()
    _cut_tar_gz(
        root / "zips" / "cut.tar.gz",
        [("notes.txt", b"batch notes\n"), ("big.dcm", data + noise), ("never.dcm", data)],
    )
    out["zips/cut.tar.gz!notes.txt"] = "skipped"
    out["zips/cut.tar.gz!big.dcm"] = "failed"
    out["zips/cut.tar.gz"] = "failed"  # the part after the cut
    ratio_tar(root / "zips" / "bomb.tgz", [("notes.txt", b"notes\n"), ("zeros.dcm", BOMB_BYTES),
                                           ("never.dcm", data)])  # fmt: skip
    out["zips/bomb.tgz!notes.txt"] = "skipped"
    out["zips/bomb.tgz!zeros.dcm"] = "failed"  # past the ratio cap on the tar's output
    out["zips/bomb.tgz"] = "failed"  # listing stopped there
    tail = np.random.default_rng(6).bytes(40_000)
    out[_rel(root, padded_nifti_bomb(root / "nifti" / "padded_bomb.nii.gz", tail, False))] = (
        "failed"
    )
    return out


def _links_outside(root: Path, template: Path) -> dict[str, str]:
    outside = root.parent / f"{root.name}_outside"
    target = _ct_instance(outside / "series", seed=51)
    (root / "links").mkdir(parents=True, exist_ok=True)
    (root / "links" / "file_outside.dcm").symlink_to(target)
    (root / "links" / "folder_outside").symlink_to(outside / "series", target_is_directory=True)
    return {"links/file_outside.dcm": "skipped", "links/folder_outside/": "skipped"}


def _junk(root: Path) -> dict[str, str]:
    return {
        _rel(root, write_corrupt_dicom(root / "junk" / "corrupt.dcm")): "failed",
        _rel(root, write_zero_byte(root / "junk" / "empty.dcm")): "failed",
        _rel(root, write_non_image(root / "junk" / "report.dcm", kind="SR", seed=61)): "skipped",
        _rel(root, write_text(root / "junk" / "README.txt")): "skipped",
    }


def _rel(root: Path, path: Path) -> str:
    return path.relative_to(root).as_posix()


def _identifiers(root: Path) -> set[str]:
    """Patient identifiers and instance UIDs in the readable files: none may reach an output."""
    found = {FAKE_PATIENT_NAME, FAKE_PATIENT_ID, FAKE_PATIENT_NAME.split("^")[0]}
    for path in root.rglob("*.dcm"):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # the corrupt files' junk values
                ds = pydicom.dcmread(path, stop_before_pixels=True)
            found.update(str(ds.get(k, "")) for k in ("StudyInstanceUID", "SeriesInstanceUID"))
        except Exception:  # noqa: BLE001, S112 - the hostile files: their UIDs are the same
            continue
    return found - {""}


def build_hostile_archive(root: Path) -> dict[str, Any]:
    """Write every hostile case under ``root`` (link targets in a sibling folder).

    Returns:
        ``expected``: relative path -> discovery status ("used"/"skipped"/"failed") of every
        record discovery must make with ``open_archives=True`` (folder records end in "/");
        ``scored_slices``: slices a screen must score (the good series and the "inf"
        InstanceNumber image); ``good_series_files``: the 30 good instances;
        ``bad_instances``: the three bad copies; ``undecodable``: the instance of the good
        series that only the read stage finds bad (discovery uses it; no slice);
        ``identifiers``: names, IDs and UIDs that no output may contain; ``paths``: every
        relative path written.
    """
    root = Path(root)
    good = write_ct_series(root / "ct_good", n_slices=GOOD_SLICES, rows=32, cols=32, seed=21)
    expected = {_rel(root, p): "used" for p in good}
    bad = _bad_copies(root, good)
    expected.update(bad)
    undecodable = _rel(root, _undecodable_extra(root, good[-1]))
    expected[undecodable] = "used"
    template = _ct_instance(root / "tmpl_ct", seed=71)
    expected[_rel(root, template)] = "used"
    expected.update(_forged(root, template))
    expected.update(_archives(root, template))
    expected.update(_links_outside(root, template))
    expected.update(_junk(root))
    return {
        "expected": expected,
        "scored_slices": GOOD_SLICES + 2,  # + the inf-InstanceNumber image and the template
        "good_series_files": [_rel(root, p) for p in good],
        "bad_instances": sorted(bad),
        "undecodable": [undecodable],
        "identifiers": _identifiers(root),
        "paths": sorted(expected),
    }
