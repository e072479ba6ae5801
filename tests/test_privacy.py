"""Privacy checks that cut across modules: malformed headers must not carry values into reasons."""

from __future__ import annotations

from pathlib import Path

import pydicom
from dicom_factory import write_ct_series
from pydicom.dataelem import DataElement

from pdd_batch.discovery import discover

NAME = "Leakyname Johanna"


def _rewrite(path: Path, tag: int, vr: str, value: str) -> None:
    ds = pydicom.dcmread(path)
    previous = pydicom.config.settings.writing_validation_mode
    pydicom.config.settings.writing_validation_mode = pydicom.config.IGNORE
    try:
        ds[tag] = DataElement(tag, vr, value)
        ds.save_as(path)
    finally:
        pydicom.config.settings.writing_validation_mode = previous


def test_free_text_modality_or_photometric_not_quoted_in_skip_reasons(tmp_path: Path) -> None:
    """A Modality or PhotometricInterpretation holding free text (a shifted or misfilled header)
    is not echoed into the skip reason (errors table, inspect output)."""
    (modality_file,) = write_ct_series(tmp_path / "a", n_slices=1, rows=16, cols=16, seed=1)
    _rewrite(modality_file, 0x00080060, "CS", NAME.upper())
    (photo_file,) = write_ct_series(tmp_path / "b", n_slices=1, rows=16, cols=16, seed=2)
    _rewrite(photo_file, 0x00280004, "CS", NAME.upper())
    disc = discover(tmp_path)
    reasons = {f.path: f.reason for f in disc.files}
    assert set(reasons) == {"a/IM0001.dcm", "b/IM0001.dcm"}
    for path, reason in reasons.items():
        assert reason, path  # both are still skipped, with a reason
        for part in NAME.upper().split():
            assert part not in reason.upper(), reason
