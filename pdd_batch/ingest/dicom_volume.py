"""DICOM series to volumes: pixel decoding (pydicom + pylibjpeg), rescale, MONOCHROME1, ordering.

Compressed transfer syntaxes (JPEG Lossless, JPEG-LS, JPEG 2000, RLE) decode through the pylibjpeg
plugins; big-endian data through pydicom. Slice order, 4D split, scout exclusion, gaps and tilt come
from ``stack_plan.plan_stacks`` on the decoded files' own headers.

One unreadable instance (cut short, empty or short pixel data, undecodable, over a cap) is left
out of its series with a warning; the others are planned again without it (so its place shows as
a gap) and screened. Only a series with no readable instance fails.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.pixels import apply_modality_lut

from pdd_batch.ingest.archive_io import (
    ArchiveReadError,
    IngestLimits,
    MemberReader,
    OverLimitError,
)
from pdd_batch.ingest.dicom_headers import (
    NATIVE_SYNTAXES,
    NO_PIXEL_DATA,
    PYDICOM_READ_ERRORS,
    DicomHeader,
    DicomHeaderError,
    header_from_dataset,
    image_bytes,
    pixel_length_problem,
    quiet_pydicom,
)
from pdd_batch.ingest.keys import series_key
from pdd_batch.ingest.reasons import exception_reason
from pdd_batch.ingest.series import LoadedSeries, SeriesReadError, SeriesRef, Volume
from pdd_batch.ingest.stack_plan import StackPlan, plan_stacks

log = logging.getLogger(__name__)
MAX_PASSES = 3  # decode passes: the second one runs without the instances the first could not


def decode_frames(ds: Dataset, header: DicomHeader) -> np.ndarray:
    """All frames of a file in modality units (HU for CT), MONOCHROME1 inverted (except CT).

    CT values are the Modality LUT output (stored * slope + intercept) whatever the photometric
    interpretation: MONOCHROME1 only says how to display them, and the CT window maps HU itself.

    Returns:
        float32 (F, H, W).

    Raises:
        SeriesReadError: pixels cannot be decoded (missing plugin, truncated or corrupt data).
    """
    n, rows, cols = len(header.frames), header.frames[0].rows, header.frames[0].cols
    try:
        stored = ds.pixel_array.reshape(n, rows, cols)  # (F, H, W)
    except (*PYDICOM_READ_ERRORS, RuntimeError, MemoryError) as exc:
        raise SeriesReadError(
            f"{header.file}: cannot decode pixels ({exception_reason(exc)})"
        ) from exc
    except BaseException as exc:
        # The Rust codecs of pylibjpeg-rle raise pyo3's PanicException (a BaseException) on
        # corrupt data; it must fail this series, not the worker.
        if type(exc).__name__ != "PanicException":
            raise
        raise SeriesReadError(f"{header.file}: cannot decode pixels (codec panic)") from exc
    return _modality_values(ds, header, stored)


def _modality_values(ds: Dataset, header: DicomHeader, stored: np.ndarray) -> np.ndarray:
    """Stored values (F, H, W) through the Modality LUT (rescale or LUT sequence) as float32."""
    invert = header.photometric == "MONOCHROME1" and header.modality != "CT"
    if "ModalityLUTSequence" in ds and "RescaleSlope" not in ds:
        try:
            out = np.asarray(apply_modality_lut(stored, ds), dtype=np.float32)
        except PYDICOM_READ_ERRORS as exc:
            raise SeriesReadError(
                f"{header.file}: bad Modality LUT ({exception_reason(exc)})"
            ) from exc
        return -out if invert else out  # negated: a monotonic flip, like the stored inversion
    out = stored.astype(np.float32)
    if invert:
        bits = int(ds.get("BitsStored", ds.get("BitsAllocated", 16)))
        if int(ds.get("PixelRepresentation", 0)) == 1:
            lo, hi = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
        else:
            lo, hi = 0, 2**bits - 1
        out = np.float32(lo + hi) - out
    slopes = np.asarray([f.slope for f in header.frames], dtype=np.float32)[:, None, None]
    inters = np.asarray([f.intercept for f in header.frames], dtype=np.float32)[:, None, None]
    return out * slopes + inters


class _BadInstance(Exception):
    """Internal: one file of a series cannot be used; ``reason`` names no path."""

    def __init__(self, rel: str, reason: str) -> None:
        super().__init__(reason)
        self.rel, self.reason = rel, reason


def _choose_stack(
    stacks: list[StackPlan], ref: SeriesRef, headers: dict[str, DicomHeader]
) -> tuple[StackPlan, list[str]]:
    """The stack discovery described in ``ref``. A file holding several stacks (a 3-plane survey in
    one multi-frame file) is in every stack's ref: the stack is found by its geometry, then by the
    part number in its key (``series_key(study, series, part)``). Left-out instances change a
    stack's slice count, so the frame size and orientation decide when no shape matches."""
    if not stacks:
        raise SeriesReadError(f"series {ref.series_key}: no image frames")
    fits = [
        (part, p)
        for part, p in enumerate(stacks)
        if p.orientation == ref.orientation
        and tuple(p.shape) == tuple(ref.shape)
        and len(p.volumes) == ref.n_volumes
    ] or [
        (part, p)
        for part, p in enumerate(stacks)
        if p.orientation == ref.orientation and tuple(p.shape[1:]) == tuple(ref.shape[1:])
    ]
    h = next(iter(headers.values()))
    keyed = [p for part, p in fits if series_key(h.study_uid, h.series_uid, part) == ref.series_key]
    chosen = keyed[0] if keyed else fits[0][1] if fits else stacks[0]
    notes = []
    if len(stacks) > 1:
        notes.append(f"{len(stacks) - 1} further stack(s) in these files not decoded here")
    return chosen, notes


def _fill_volumes(
    plan: StackPlan, datasets: dict[str, Dataset], headers: dict[str, DicomHeader]
) -> tuple[list[np.ndarray], dict[str, str]]:
    """Decode each file once and scatter its frames into the planned volumes.

    Returns:
        The volumes, and the files that could not be decoded with why (their slots are unset:
        the caller plans again without them).
    """
    slots: dict[str, list[tuple[int, int, int]]] = {}
    for v, frames in enumerate(plan.volumes):
        for z, f in enumerate(frames):
            slots.setdefault(f.file, []).append((f.frame, v, z))
    arrays = [
        np.empty((len(frames), frames[0].rows, frames[0].cols), dtype=np.float32)
        for frames in plan.volumes
    ]  # each (Z, H, W)
    failed: dict[str, str] = {}
    for rel, targets in slots.items():
        try:
            decoded = decode_frames(datasets.pop(rel), headers[rel])  # (F, H, W); frees the file
        except SeriesReadError as exc:
            failed[rel] = str(exc).removeprefix(f"{rel}: ")
            continue
        for frame, v, z in targets:
            arrays[v][z] = decoded[frame]
    return arrays, failed


def _pixel_problem(ds: Dataset, header: DicomHeader, limits: IngestLimits) -> str | None:
    """Why this instance's pixel data cannot give its image (None: try to decode it)."""
    if "PixelData" not in ds:
        if "FloatPixelData" in ds or "DoubleFloatPixelData" in ds:
            return None  # float pixel data: pydicom decides
        return NO_PIXEL_DATA
    length = len(ds.PixelData)
    if header.transfer_syntax in NATIVE_SYNTAXES or length == 0:
        return pixel_length_problem(header, length)
    try:
        limits.check_ratio("compressed image", image_bytes(header), length)
    except OverLimitError as exc:
        return str(exc)
    return None


def _read_instance(
    reader: MemberReader, rel: str, limits: IngestLimits
) -> tuple[Dataset, DicomHeader]:
    """One whole file with its header facts, checked.

    Raises:
        _BadInstance: anything that makes this file unusable (any error: hostile input).
    """
    try:
        with reader.source(rel).open() as fh, quiet_pydicom():
            ds = pydicom.dcmread(fh)
            header = header_from_dataset(ds, rel, limits)
            problem = _pixel_problem(ds, header, limits) if header.has_image else "no image pixels"
    except (DicomHeaderError, OverLimitError) as exc:
        raise _BadInstance(rel, str(exc)) from exc
    except ArchiveReadError as exc:
        cause = exc.__cause__
        reason = f"cannot read file ({type(cause).__name__})" if cause else "file not found"
        raise _BadInstance(rel, reason) from exc
    except Exception as exc:  # noqa: BLE001 - pydicom raises many types on damaged files
        raise _BadInstance(rel, f"unreadable DICOM ({type(exc).__name__})") from exc
    if problem:
        raise _BadInstance(rel, problem)
    return ds, header


def _read_files(
    reader: MemberReader,
    ref: SeriesRef,
    files: tuple[str, ...],
    bad: dict[str, str],
    limits: IngestLimits,
) -> tuple[dict[str, Dataset], dict[str, DicomHeader]]:
    """Every file of ``files`` not in ``bad``, read whole, with its header facts; files that
    cannot be used are added to ``bad``.

    Raises:
        SeriesReadError: no file of the series can be used.
    """
    datasets: dict[str, Dataset] = {}
    headers: dict[str, DicomHeader] = {}
    for rel in files:
        if rel in bad:
            continue
        try:
            datasets[rel], headers[rel] = _read_instance(reader, rel, limits)
        except _BadInstance as exc:
            bad[rel] = exc.reason
    if not headers:
        first = next(iter(bad.values()), "no files")
        raise SeriesReadError(f"series {ref.series_key}: no readable instance ({first})")
    return datasets, headers


def _files_to_read(ref: SeriesRef, bad: dict[str, str]) -> tuple[str, ...]:
    """The series' files; with its spares once one of them proved unusable."""
    return (*ref.files, *ref.spares) if bad else ref.files


def _decode_series(
    root: Path, ref: SeriesRef, limits: IngestLimits
) -> tuple[StackPlan, list[np.ndarray], list[str], dict[str, str]]:
    """Plan and decode the series without its unusable instances. Once one of ``ref.files`` is
    unusable, the series' spares (copies discovery left out) are read too: the plan then takes a
    readable copy for the slice of an unusable instance.

    Returns:
        (plan, volumes (Z, H, W) each, notes, left-out files -> reason).
    """
    bad: dict[str, str] = {}
    with MemberReader(root, limits) as reader:
        for _ in range(MAX_PASSES + 1):
            files = _files_to_read(ref, bad)
            datasets, headers = _read_files(reader, ref, files, bad, limits)
            frames = [f for h in headers.values() for f in h.frames]
            stacks, scouts = plan_stacks(frames)
            plan, notes = _choose_stack(stacks, ref, headers)
            voxels = sum(len(v) * v[0].rows * v[0].cols for v in plan.volumes)
            try:
                limits.check_voxels("series", voxels)
            except OverLimitError as exc:
                raise SeriesReadError(f"series {ref.series_key}: {exc}") from exc
            arrays, failed = _fill_volumes(plan, datasets, headers)
            bad.update(failed)
            if not failed and files == _files_to_read(ref, bad):
                if scouts:
                    notes.append(f"{len(scouts)} scout/localizer frame(s) excluded at load")
                return plan, arrays, notes, bad
    raise SeriesReadError(f"series {ref.series_key}: instances keep failing to decode")


def _left_out_note(bad: dict[str, str]) -> str:
    """One warning for the instances left out (reasons only, no paths)."""
    reasons = sorted(set(bad.values()))
    shown = "; ".join(reasons[:3]) + ("; ..." if len(reasons) > 3 else "")
    return f"{len(bad)} unreadable instance(s) left out ({shown})"


def load_dicom_series(
    root: Path, ref: SeriesRef, limits: IngestLimits | None = None
) -> LoadedSeries:
    """Decode one DICOM series into volumes (4D series give one volume per time point).

    Instances that cannot be read or decoded are left out with a warning (see the module
    docstring).

    Raises:
        SeriesReadError: no instance of the series can be used, or it is over ``limits``.
    """
    plan, arrays, notes, left_out = _decode_series(root, ref, limits or IngestLimits())
    bad = {f: r for f, r in left_out.items() if f in ref.files}  # a spare that fails: not needed
    directions = None if plan.directions is None else np.asarray(plan.directions, dtype=np.float64)
    volumes = [
        Volume(
            data=arr,
            source_files=tuple(f.file for f in frames_v),
            frames=tuple(f.frame for f in frames_v),
            spacing=plan.spacing,
            directions=directions,
            label=f"t={t}" if len(plan.volumes) > 1 and plan.directions is not None else "",
        )
        for t, (arr, frames_v) in enumerate(zip(arrays, plan.volumes, strict=True))
    ]
    warnings = list(ref.warnings)
    for w in (*plan.warnings, *notes):
        if w not in warnings:
            warnings.append(w)
    if bad:
        warnings.append(_left_out_note(bad))
        log.warning("series %s: %d unreadable instance(s) left out", ref.series_key, len(bad))
    log.debug("series %s: %d volume(s), %d slices", ref.series_key, len(volumes), plan.n_slices)
    return LoadedSeries(
        ref=ref, modality=ref.modality, volumes=volumes, warnings=warnings, unreadable=dict(bad)
    )
