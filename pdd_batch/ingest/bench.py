"""`pdd-batch bench ingest`: discovery headers/s (warm cache) and decode+window+resize slices/s.

Measured on the head CT series in ``../shared/data/dicom`` when present (109 JPEG-Lossless
512x512 slices), else on a generated uncompressed CT series of the same size. Prints measured
numbers only; the last line is ``ingest: discovery X files/s, slicing Y slices/s``.
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from pdd_batch.ingest.discovery import discover
from pdd_batch.ingest.preprocess import PreprocessSpec
from pdd_batch.ingest.slicing import iter_model_slices
from pdd_batch.ingest.volume import load_series

HEAD_CT = ("data", "dicom", "cq500_ct1_head_ct")
DISCOVERY_GOAL = 2000.0  # files/s, warm cache
REPEATS = 5


def _shared_root() -> Path:
    default = Path(__file__).resolve().parents[3] / "shared"
    return Path(os.environ.get("PDD_SHARED", default))


def _write_synthetic_ct(directory: Path, n_slices: int = 110, size: int = 512) -> None:
    """An uncompressed 512x512 CT series (used only when the shared head CT is absent)."""
    study, series = generate_uid(), generate_uid()
    rng = np.random.default_rng(0)
    for k in range(n_slices):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
        ds.Modality, ds.StudyInstanceUID, ds.SeriesInstanceUID = "CT", study, series
        ds.InstanceNumber = k + 1
        ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
        ds.ImagePositionPatient = [0.0, 0.0, 0.625 * k]
        ds.PixelSpacing = [0.45, 0.45]
        ds.RescaleSlope, ds.RescaleIntercept = 1.0, -1024.0
        ds.Rows = ds.Columns = size
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
        ds.PixelData = rng.integers(0, 2400, (size, size), dtype=np.uint16).tobytes()
        ds.save_as(directory / f"CT{k:04d}.dcm", enforce_file_format=True)


def _time_discovery(root: Path) -> tuple[int, float, float]:
    """(files, median wall seconds, median CPU seconds) of warm discovery runs."""
    discover(root)  # cold pass fills the page cache
    walls, cpus, n_files = [], [], 0
    for _ in range(REPEATS):
        t0, c0 = time.perf_counter(), time.process_time()
        result = discover(root)
        walls.append(time.perf_counter() - t0)
        cpus.append(time.process_time() - c0)
        n_files = result.counts()["seen"]
    return n_files, statistics.median(walls), statistics.median(cpus)


def _time_slicing(root: Path, spec: PreprocessSpec) -> tuple[int, float, float]:
    """(slices, decode seconds, window+resize seconds) for the largest series under root."""
    ref = max(discover(root).series, key=lambda r: r.n_slices)
    t0 = time.perf_counter()
    loaded = load_series(root, ref)
    t1 = time.perf_counter()
    n = sum(1 for _ in iter_model_slices(loaded, spec))
    t2 = time.perf_counter()
    return n, t1 - t0, t2 - t1


def run_ingest_benchmark(print_fn: Callable[[str], None] = print) -> dict[str, float]:
    """Measure and print discovery files/s and decode+window+resize slices/s.

    Returns:
        {"discovery_files_per_s", "slices_per_s", "decode_slices_per_s", "window_slices_per_s"}.
    """
    spec = PreprocessSpec(image_size=256)
    shared = _shared_root().joinpath(*HEAD_CT)
    with tempfile.TemporaryDirectory(prefix="pdd-bench-ingest-") as tmp:
        if shared.is_dir():
            root, what = shared, "shared head CT (JPEG Lossless 512x512)"
        else:
            root, what = Path(tmp), "generated CT (uncompressed 512x512; shared data absent)"
            _write_synthetic_ct(root)
        print_fn(f"data: {what}; pydicom {pydicom.__version__}; image size {spec.image_size}")
        n_files, t_disc, cpu_disc = _time_discovery(root)
        files_s = n_files / t_disc
        goal = "meets" if files_s >= DISCOVERY_GOAL else "below"
        print_fn(
            f"discovery (warm, median of {REPEATS}): {n_files} files in {t_disc * 1e3:.1f} ms "
            f"= {files_s:.0f} files/s ({goal} the {DISCOVERY_GOAL:.0f} files/s goal); "
            f"{n_files / max(cpu_disc, 1e-9):.0f} files per CPU-second (load-independent)"
        )
        n, t_dec, t_win = _time_slicing(root, spec)
    total = n / (t_dec + t_win)
    print_fn(f"decode: {n} slices in {t_dec:.2f} s = {n / t_dec:.1f} slices/s")
    print_fn(f"window+resize: {n} slices in {t_win:.2f} s = {n / t_win:.1f} slices/s")
    print_fn(f"ingest: discovery {files_s:.0f} files/s, slicing {total:.1f} slices/s")
    return {
        "discovery_files_per_s": files_s,
        "slices_per_s": total,
        "decode_slices_per_s": n / t_dec,
        "window_slices_per_s": n / t_win,
    }
