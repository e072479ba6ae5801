"""NIfTI-1/-2 files (.nii, .nii.gz): header facts for discovery, and lazy per-volume decoding.

Volumes are reoriented to the closest canonical orientation (RAS+, the same transform as
``nibabel.as_closest_canonical``), applied one 3D volume at a time so a 4D file is never loaded
whole. They are returned as (Z, H, W) = (S, A, R) axes with LPS direction vectors, the same
convention as DICOM volumes, so slicing treats both alike. Scaling (scl_slope/inter), big-endian
and float64 data are handled by nibabel; values are returned as float32.

Before any voxel is read, the header's size is checked against ``IngestLimits`` (voxels, and the
gzip expansion ratio of .nii.gz files); gzip streams are never inflated past what the header
promises (a gzip "bomb" with a forged size field stops there). A .nii.gz whose gzip size field
does not match the header (several gzip members, bytes padded after the stream, a cut file) is
inflated once, in chunks, up to the header's size: the ratio cap then applies to that output
over the compressed bytes that produced it, so padding cannot dilute the ratio.
"""

from __future__ import annotations

import io
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
from nibabel.filebasedimages import ImageFileError
from nibabel.orientations import OrientationError, apply_orientation, inv_ornt_aff, io_orientation
from nibabel.spatialimages import HeaderDataError, ImageDataError
from nibabel.wrapstruct import WrapStructError

from pdd_batch.ingest.archive_io import (
    ArchiveReadError,
    IngestLimits,
    MemberReader,
    OverLimitError,
    split_member,
)
from pdd_batch.ingest.series import LoadedSeries, SeriesReadError, SeriesRef, Volume

NIFTI_SUFFIXES = (".nii", ".nii.gz")
LPS_FROM_RAS = np.diag([-1.0, -1.0, 1.0])
# What nibabel raises on damaged files (header checks, bad data codes, short streams).
NIB_ERRORS = (
    ImageFileError,
    HeaderDataError,
    ImageDataError,
    WrapStructError,
    OrientationError,
    OSError,
    EOFError,
    ValueError,
    struct.error,
    zlib.error,
)


class NiftiReadError(ValueError):
    """A NIfTI file that cannot be used (message has the reason only)."""


def is_nifti_name(name: str) -> bool:
    """True for .nii / .nii.gz names."""
    low = name.lower()
    return any(low.endswith(s) for s in NIFTI_SUFFIXES)


@dataclass(frozen=True)
class NiftiInfo:
    """Header facts of a NIfTI file, in canonical (RAS) axis order.

    Attributes:
        shape: (X, Y, Z) of one canonical volume.
        n_volumes: time points (1 for 3D).
        zooms: voxel sizes (x, y, z) in mm, canonical order.
        orientation: axis codes of the file as stored, e.g. "LAS".
        dtype: on-disk data type.
    """

    shape: tuple[int, int, int]
    n_volumes: int
    zooms: tuple[float, float, float]
    orientation: str
    dtype: str


def _spatial_shape(img: nib.spatialimages.SpatialImage) -> tuple[tuple[int, ...], int]:
    """The 3D shape and number of volumes; trailing singleton dims beyond 4 are dropped."""
    shape = tuple(int(n) for n in img.shape)
    while len(shape) > 4 and shape[-1] == 1:
        shape = shape[:-1]
    if len(shape) > 4:
        raise NiftiReadError(f"{len(shape)}-dimensional NIfTI not supported")
    if any(n < 1 for n in shape):
        raise NiftiReadError(f"empty NIfTI shape {shape}")
    spatial = (shape + (1, 1, 1))[:3]
    n_volumes = shape[3] if len(shape) == 4 else 1
    return spatial, n_volumes


def _expected_bytes(img: nib.spatialimages.SpatialImage) -> int:
    header = img.header
    n_voxels = int(np.prod(img.shape))
    return int(header.get_data_offset()) + n_voxels * header.get_data_dtype().itemsize


def _check_limits(
    img: nib.spatialimages.SpatialImage, path_or_bytes: Path | bytes, gz: bool, limits: IngestLimits
) -> None:
    """Raise ``NiftiReadError`` for a header over ``limits`` (voxels; a .nii.gz file's ratio)."""
    try:
        limits.check_voxels("NIfTI image", int(np.prod(img.shape, dtype=np.float64)))
        if gz and isinstance(path_or_bytes, Path):
            stored = path_or_bytes.stat().st_size
            limits.check_ratio("gzip-compressed NIfTI", _expected_bytes(img), stored)
    except OverLimitError as exc:
        raise NiftiReadError(str(exc)) from exc


def _check_complete(
    path_or_bytes: Path | bytes, gz: bool, expected: int, limits: IngestLimits
) -> None:
    """Raise if the file holds fewer bytes than its header promises (a truncated copy), or (a
    .nii.gz of several gzip members or with bytes after its stream) if the compressed bytes
    those promised bytes inflate from are over the compression-ratio cap."""
    if isinstance(path_or_bytes, bytes):
        actual = len(path_or_bytes)
    elif not gz:
        actual = path_or_bytes.stat().st_size
    else:
        with open(path_or_bytes, "rb") as fh:
            fh.seek(-4, io.SEEK_END)
            (isize,) = struct.unpack("<I", fh.read(4))
        if isize == expected % 2**32:
            return
        actual, consumed = _gzip_extent(path_or_bytes, expected)  # several members, padded, cut
        if actual >= expected:
            try:
                limits.check_ratio("gzip-compressed NIfTI", actual, consumed)
            except OverLimitError as exc:
                raise NiftiReadError(str(exc)) from exc
    if actual < expected:
        raise NiftiReadError(f"truncated NIfTI: {actual} of {expected} bytes")


def _gzip_extent(path: Path, enough: int) -> tuple[int, int]:
    """(bytes inflated, compressed bytes they took) of the gzip members of ``path``, inflating
    at most ``enough`` bytes in 1 MiB pieces (never the whole of a bomb, nor bytes after it)."""
    out = consumed = 0
    inflater = zlib.decompressobj(zlib.MAX_WBITS | 16)  # one gzip member
    pending = b""
    try:
        with open(path, "rb") as fh:
            while out < enough:
                if not pending and not (pending := fh.read(1 << 16)):
                    break  # end of the file
                before = len(pending)
                out += len(inflater.decompress(pending, min(1 << 20, enough - out)))
                if inflater.eof:  # the member ended: the next one starts in unused_data
                    pending = inflater.unused_data
                    inflater = zlib.decompressobj(zlib.MAX_WBITS | 16)
                else:
                    pending = inflater.unconsumed_tail
                consumed += before - len(pending)
    except zlib.error:
        pass  # a cut stream or bytes that are no gzip member: what was inflated so far counts
    return out, consumed


def _gunzip_bounded(raw: bytes, limits: IngestLimits) -> bytes:
    """Inflate a gzip member held in memory, refusing output past the member-size or ratio cap.

    Raises:
        NiftiReadError: a corrupt stream, or one expanding past the caps.
    """
    cap = min(limits.max_member_bytes, int(limits.max_compression_ratio * len(raw)))
    out, rest = bytearray(), raw
    try:
        while rest and len(out) <= cap:  # one pass per gzip member
            inflater = zlib.decompressobj(zlib.MAX_WBITS | 16)
            out += inflater.decompress(rest, cap + 1 - len(out))
            if not inflater.eof:
                break  # cut short (nibabel's size check says so) or the cap reached
            rest = inflater.unused_data
    except zlib.error as exc:
        raise NiftiReadError("truncated or corrupt gzip stream") from exc
    if len(out) > cap:
        try:
            limits.check_member(len(out))
            limits.check_ratio("gzip-compressed NIfTI", len(out), len(raw))
        except OverLimitError as exc:
            raise NiftiReadError(str(exc)) from exc
    return bytes(out)


def _from_bytes(raw: bytes) -> nib.spatialimages.SpatialImage:
    for cls in (nib.Nifti1Image, nib.Nifti2Image):
        try:
            return cls.from_bytes(raw)
        except NIB_ERRORS:
            continue
    raise NiftiReadError("not a NIfTI-1/-2 file")


def open_nifti(
    root: Path, rel: str, raw: bytes | None = None, limits: IngestLimits | None = None
) -> tuple[nib.spatialimages.SpatialImage, Path | bytes]:
    """Open (lazily for plain files) the NIfTI named by ``rel``; returns (image, source).

    ``raw``: the bytes of an archive member when the caller already holds them.
    """
    _, member = split_member(rel)
    limits = limits or IngestLimits()
    try:
        if member is None:
            path = Path(root) / rel
            return nib.load(path), path
        if raw is None:
            with MemberReader(root, limits) as reader:
                raw = reader.read(rel)
        if member.lower().endswith(".gz"):
            raw = _gunzip_bounded(raw, limits)
        return _from_bytes(raw), raw
    except OverLimitError as exc:
        raise NiftiReadError(str(exc)) from exc
    except (ArchiveReadError, NiftiReadError) as exc:
        raise NiftiReadError(str(exc)) from exc
    except NIB_ERRORS as exc:
        raise NiftiReadError(f"unreadable NIfTI header ({type(exc).__name__})") from exc


def _checked_geometry(
    img: nib.spatialimages.SpatialImage, source: Path | bytes, rel: str, limits: IngestLimits
) -> tuple[tuple[int, ...], int, np.ndarray]:
    """The checks every reader of a NIfTI file makes before touching voxels (dimensions, dtype,
    caps, completeness); returns (spatial shape, volumes, orientation).

    Raises:
        NiftiReadError: unsupported dimensions or dtype, over a cap, or truncated.
    """
    spatial, n_volumes = _spatial_shape(img)
    _check_dtype(img)
    gz = rel.lower().endswith(".gz")
    _check_limits(img, source, gz, limits)
    _check_complete(source, gz, _expected_bytes(img), limits)
    return spatial, n_volumes, _orientation(img)


def read_nifti_info(
    root: Path, rel: str, raw: bytes | None = None, limits: IngestLimits | None = None
) -> NiftiInfo:
    """Header facts for discovery (no voxel data is decoded).

    Args:
        root: archive root.
        rel: relative path (or ``archive!member``).
        raw: the member's bytes when already read (archives).
        limits: caps on voxels and gzip expansion (default ``IngestLimits()``).

    Raises:
        NiftiReadError: unreadable header, unsupported dimensions, over a cap, or truncated.
    """
    limits = limits or IngestLimits()
    img, source = open_nifti(root, rel, raw, limits)
    try:
        spatial, n_volumes, ornt = _checked_geometry(img, source, rel, limits)
        zooms_stored = (tuple(float(z) for z in img.header.get_zooms()[:3]) + (1.0,) * 3)[:3]
        dtype = str(img.get_data_dtype())
    except NiftiReadError:
        raise
    except NIB_ERRORS as exc:
        raise NiftiReadError(f"unusable NIfTI header ({type(exc).__name__})") from exc
    shape, zooms = [0, 0, 0], [0.0, 0.0, 0.0]
    for stored_axis, canonical_axis in enumerate(ornt[:, 0].astype(int)):
        shape[canonical_axis] = int(spatial[stored_axis])
        zooms[canonical_axis] = zooms_stored[stored_axis]
    return NiftiInfo(
        shape=(shape[0], shape[1], shape[2]),
        n_volumes=n_volumes,
        zooms=(zooms[0], zooms[1], zooms[2]),
        orientation="".join(nib.aff2axcodes(img.affine)),
        dtype=dtype,
    )


def _check_dtype(img: nib.spatialimages.SpatialImage) -> None:
    """Reject voxel types with no grey value (RGB/RGBA records); complex data gives magnitude."""
    if img.get_data_dtype().fields is not None:
        raise NiftiReadError(f"unsupported data type {img.get_data_dtype()} (colour voxels)")


def _orientation(img: nib.spatialimages.SpatialImage) -> np.ndarray:
    """``io_orientation`` of the affine: row i = (canonical axis of stored axis i, flip)."""
    ornt = io_orientation(img.affine)
    if np.isnan(ornt).any():
        raise NiftiReadError("degenerate affine (no orientation)")
    return ornt


def _canonical_geometry(
    img: nib.spatialimages.SpatialImage, spatial: tuple[int, ...], ornt: np.ndarray
) -> tuple[tuple[float, float, float], np.ndarray]:
    """(Z, H, W) spacing and LPS directions of the canonical (S, A, R)-ordered array."""
    affine = img.affine @ inv_ornt_aff(ornt, spatial)
    cols = affine[:3, :3]  # columns: canonical x (R), y (A), z (S) voxel steps
    norms = np.linalg.norm(cols, axis=0)
    norms[norms == 0] = 1.0
    unit = LPS_FROM_RAS @ (cols / norms)
    directions = np.stack([unit[:, 2], unit[:, 1], unit[:, 0]])  # (3, 3): Z, H, W axes
    return (float(norms[2]), float(norms[1]), float(norms[0])), directions


def _read_voxels(img: nib.spatialimages.SpatialImage, rel: str, t: int | None) -> np.ndarray:
    """Scaled float32 voxels: all of them (t None) or volume ``t`` of a 4D image."""
    try:
        if t is None or len(img.shape) < 4:
            raw = img.dataobj[...]
        else:
            raw = img.dataobj[:, :, :, t]
        if np.iscomplexobj(raw):
            raw = np.abs(raw)  # complex MR: the magnitude image
        return np.asarray(raw, dtype=np.float32)
    except (*NIB_ERRORS, MemoryError) as exc:
        raise SeriesReadError(f"{rel}: cannot read voxel data ({type(exc).__name__})") from exc


def load_nifti_series(
    root: Path, ref: SeriesRef, limits: IngestLimits | None = None
) -> LoadedSeries:
    """Decode a NIfTI series (one file), one canonical volume at a time.

    Raises:
        SeriesReadError: unreadable or truncated file, or over ``limits``.
    """
    rel = ref.files[0]
    limits = limits or IngestLimits()
    try:
        img, source = open_nifti(root, rel, None, limits)
        spatial, n_volumes, ornt = _checked_geometry(img, source, rel, limits)
    except NiftiReadError as exc:
        raise SeriesReadError(f"{rel}: {exc}") from exc
    except NIB_ERRORS as exc:
        raise SeriesReadError(f"{rel}: unusable NIfTI header ({type(exc).__name__})") from exc
    spacing, directions = _canonical_geometry(img, spatial, ornt)
    # Plain .nii is memory-mapped: slice one volume at a time. A gzip stream cannot seek, so
    # per-volume reads would decompress it T times: read it once instead.
    whole = _read_voxels(img, rel, None) if rel.lower().endswith(".gz") else None
    volumes = []
    for t in range(n_volumes):
        if whole is not None:
            arr = (whole[:, :, :, t] if whole.ndim >= 4 else whole).reshape(spatial)
        else:
            arr = _read_voxels(img, rel, t).reshape(spatial)  # (X, Y, Z) as stored
        canon = apply_orientation(arr, ornt)  # (R, A, S) canonical
        data = np.ascontiguousarray(canon.transpose(2, 1, 0), dtype=np.float32)  # (Z, H, W)
        z = data.shape[0]
        volumes.append(
            Volume(
                data=data,
                source_files=(rel,) * z,
                frames=tuple(range(z)),
                spacing=spacing,
                directions=directions,
                label=f"t={t}" if n_volumes > 1 else "",
            )
        )
    warnings = list(ref.warnings)
    if not all(np.isfinite(v.data).all() for v in volumes):
        warnings.append("non-finite voxel values (NaN/inf) present")
    return LoadedSeries(ref=ref, modality=ref.modality, volumes=volumes, warnings=warnings)
