"""Discovery part of `pdd-batch bench nightly`: the first discovery of an archive of small
synthetic CT files (every header read) against a second one of the same, unchanged archive
(every file a ``stat`` and an index lookup). Files are made from one pydicom template whose
marker digits are replaced per file (fast enough for 10^5 files)."""

from __future__ import annotations

import io
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian

from pdd_batch.runs.discovery_index import discover_indexed
from pdd_batch.runs.state import RunState

FILES_PER_SERIES = 100
_ROOT = "1.2.826.0.1.3680043.8.498."
_SERIES, _INSTANCE, _Z = b"31415926", b"27182818", b"5555.5"


def _template() -> bytes:
    """One 4x4 CT file with marker digits in its series UID, instance UID and position."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = _ROOT + "2." + _INSTANCE.decode()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "CT"
    ds.StudyInstanceUID = _ROOT + "1." + _SERIES.decode()
    ds.SeriesInstanceUID = _ROOT + "3." + _SERIES.decode()
    ds.ImagePositionPatient = ["0", "0", _Z.decode()]
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.PixelSpacing = [0.7, 0.7]
    ds.Rows = ds.Columns = 4
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
    ds.RescaleSlope, ds.RescaleIntercept = 1, -1024
    ds.PixelData = np.zeros((4, 4), np.int16).tobytes()
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def write_archive(root: Path, n_files: int) -> None:
    """``n_files`` files, ``FILES_PER_SERIES`` per series and folder."""
    template = _template()
    for i in range(n_files):
        series, k = divmod(i, FILES_PER_SERIES)
        data = template.replace(_SERIES, b"%08d" % series).replace(_INSTANCE, b"%08d" % i)
        data = data.replace(_Z, b"%06.1f" % (k * 2.5))
        folder = root / f"series{series:05d}"
        if k == 0:
            folder.mkdir(parents=True, exist_ok=True)
        (folder / f"im{k:04d}.dcm").write_bytes(data)


def time_discovery(
    root: Path, n_files: int, print_fn: Callable[[str], None] = print
) -> dict[str, float]:
    """Seconds of the first and the second discovery of an unchanged archive."""
    write_archive(root, n_files)
    state = RunState.load(root.parent / "discovery-run")
    times, reads = [], []
    for _ in range(2):
        t = time.perf_counter()
        _, stats = discover_indexed(state, root)
        times.append(time.perf_counter() - t)
        reads.append(stats["header_reads"])
    state.close()
    print_fn(
        f"discovery of {n_files:,} files: first {times[0]:.1f} s ({reads[0]:,} header reads), "
        f"second, unchanged {times[1]:.1f} s ({reads[1]:,} header reads); "
        f"{times[0] / max(times[1], 1e-9):.1f}x faster"
    )
    return {"discovery_first_s": times[0], "discovery_second_s": times[1]}
