"""DICOM series to volumes: pixel decoding (pydicom + pylibjpeg), rescale, MONOCHROME1, ordering.

Compressed transfer syntaxes (JPEG Lossless, JPEG-LS, JPEG 2000, RLE) decode through the pylibjpeg
plugins; big-endian data through pydicom. Slice order, 4D split, scout exclusion, gaps and tilt come
from ``stack_plan.plan_stacks`` on the decoded files' own headers.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.pixels import apply_modality_lut

from pdd_batch.ingest.archive_io import ArchiveReadError, MemberReader
from pdd_batch.ingest.dicom_headers import (
    PYDICOM_READ_ERRORS,
    DicomHeader,
    header_from_dataset,
    quiet_pydicom,
)
from pdd_batch.ingest.keys import series_key
from pdd_batch.ingest.reasons import exception_reason
from pdd_batch.ingest.series import LoadedSeries, SeriesReadError, SeriesRef, Volume
from pdd_batch.ingest.stack_plan import StackPlan, plan_stacks

log = logging.getLogger(__name__)


def read_dataset(reader: MemberReader, rel: str) -> Dataset:
    """Read one whole DICOM file (pixels included) named by its relative path.

    Raises:
        SeriesReadError: the file is missing, not DICOM, or its header cannot be parsed.
    """
    try:
        with reader.source(rel).open() as fh, quiet_pydicom():
            return pydicom.dcmread(fh)
    except ArchiveReadError as exc:
        raise SeriesReadError(str(exc)) from exc
    except PYDICOM_READ_ERRORS as exc:
        raise SeriesReadError(f"{rel}: unreadable DICOM ({type(exc).__name__})") from exc


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


def _choose_stack(
    stacks: list[StackPlan], ref: SeriesRef, headers: dict[str, DicomHeader]
) -> tuple[StackPlan, list[str]]:
    """The stack discovery described in ``ref``. A file holding several stacks (a 3-plane survey in
    one multi-frame file) is in every stack's ref: the stack is found by its geometry, then by the
    part number in its key (``series_key(study, series, part)``)."""
    if not stacks:
        raise SeriesReadError(f"series {ref.series_key}: no image frames")
    fits = [
        (part, p)
        for part, p in enumerate(stacks)
        if p.orientation == ref.orientation
        and tuple(p.shape) == tuple(ref.shape)
        and len(p.volumes) == ref.n_volumes
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
) -> list[np.ndarray]:
    """Decode each file once and scatter its frames into the planned volumes."""
    slots: dict[str, list[tuple[int, int, int]]] = {}
    for v, frames in enumerate(plan.volumes):
        for z, f in enumerate(frames):
            slots.setdefault(f.file, []).append((f.frame, v, z))
    arrays = [
        np.empty((len(frames), frames[0].rows, frames[0].cols), dtype=np.float32)
        for frames in plan.volumes
    ]  # each (Z, H, W)
    for rel, targets in slots.items():
        decoded = decode_frames(datasets.pop(rel), headers[rel])  # (F, H, W); frees the file
        for frame, v, z in targets:
            arrays[v][z] = decoded[frame]
    return arrays


def _read_files(root: Path, ref: SeriesRef) -> tuple[dict[str, Dataset], dict[str, DicomHeader]]:
    """Every file of the series, read whole, with its header facts."""
    datasets: dict[str, Dataset] = {}
    headers: dict[str, DicomHeader] = {}
    with MemberReader(root) as reader:
        for rel in ref.files:
            ds = read_dataset(reader, rel)
            try:
                with quiet_pydicom():
                    header = header_from_dataset(ds, rel)
            except PYDICOM_READ_ERRORS as exc:
                reason = f"malformed DICOM header ({type(exc).__name__})"
                raise SeriesReadError(f"{rel}: {reason}") from exc
            if not header.has_image:
                raise SeriesReadError(f"{rel}: no image pixels")
            datasets[rel], headers[rel] = ds, header
    return datasets, headers


def load_dicom_series(root: Path, ref: SeriesRef) -> LoadedSeries:
    """Decode one DICOM series into volumes (4D series give one volume per time point).

    Raises:
        SeriesReadError: a file cannot be read or decoded (the whole series fails; its key and the
            relative file are in the message).
    """
    datasets, headers = _read_files(root, ref)
    frames = [f for h in headers.values() for f in h.frames]
    stacks, scouts = plan_stacks(frames)
    plan, notes = _choose_stack(stacks, ref, headers)
    arrays = _fill_volumes(plan, datasets, headers)
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
    if scouts:
        warnings.append(f"{len(scouts)} scout/localizer frame(s) excluded at load")
    log.debug("series %s: %d volume(s), %d slices", ref.series_key, len(volumes), plan.n_slices)
    return LoadedSeries(ref=ref, modality=ref.modality, volumes=volumes, warnings=warnings)
