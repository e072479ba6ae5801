"""Burned-in text risk (`review.burned_in`): which DICOM files export withholds by default."""

from __future__ import annotations

from pathlib import Path

import pydicom
import pytest
from dicom_factory import write_ct_series, write_xray

from pdd_batch.review.burned_in import BurnedIn, burned_in_risk, inherited_flag

SC_IMAGE = "1.2.840.10008.5.1.4.1.1.7"
SC_TRUE_COLOR = "1.2.840.10008.5.1.4.1.1.7.4"


def _file(tmp_path: Path, modality: str, **attrs) -> pydicom.Dataset:
    """A real file of ``modality`` with ``attrs`` set, written and read back."""
    if modality in ("DX", "CR"):
        path = write_xray(tmp_path / "x.dcm", modality=modality)
    else:
        (path,) = write_ct_series(tmp_path / "s", n_slices=1, modality="CT")
    ds = pydicom.dcmread(path)
    ds.Modality = modality
    for kw, value in attrs.items():
        setattr(ds, kw, value)
    ds.save_as(path, enforce_file_format=True)
    return pydicom.dcmread(path, stop_before_pixels=True)


@pytest.mark.parametrize(
    ("modality", "attrs", "expected"),
    [
        ("CT", {}, BurnedIn.UNKNOWN),
        ("MR", {}, BurnedIn.UNKNOWN),
        ("CT", {"BurnedInAnnotation": "YES"}, BurnedIn.YES),
        ("CT", {"BurnedInAnnotation": "yes"}, BurnedIn.YES),
        ("US", {"BurnedInAnnotation": "NO"}, BurnedIn.NO),  # an explicit NO is trusted
        ("DX", {"BurnedInAnnotation": "NO"}, BurnedIn.NO),
        ("DX", {}, BurnedIn.UNKNOWN_HIGH_RISK),
        ("CR", {}, BurnedIn.UNKNOWN_HIGH_RISK),
        ("US", {}, BurnedIn.UNKNOWN_HIGH_RISK),
        ("XA", {"BurnedInAnnotation": ""}, BurnedIn.UNKNOWN_HIGH_RISK),
        ("OT", {}, BurnedIn.UNKNOWN_HIGH_RISK),
        ("MG", {"BurnedInAnnotation": "UNKNOWN"}, BurnedIn.UNKNOWN_HIGH_RISK),
        ("", {}, BurnedIn.UNKNOWN_HIGH_RISK),  # no modality: assume the worst
        ("CT", {"SOPClassUID": SC_IMAGE}, BurnedIn.UNKNOWN_HIGH_RISK),  # a dose-report capture
        ("MR", {"SOPClassUID": SC_TRUE_COLOR}, BurnedIn.UNKNOWN_HIGH_RISK),
        ("CT", {"ImageType": ["DERIVED", "SECONDARY", "SCREEN SAVE"]}, BurnedIn.UNKNOWN_HIGH_RISK),
        ("CT", {"ImageType": ["DERIVED", "SECONDARY", "MPR"]}, BurnedIn.UNKNOWN),  # a reformat
    ],
)
def test_burned_in_risk(tmp_path: Path, modality: str, attrs: dict, expected: BurnedIn) -> None:
    ds = _file(tmp_path, modality, **attrs)
    risk = burned_in_risk(ds)
    assert risk is expected
    assert risk.possible == (expected in (BurnedIn.YES, BurnedIn.UNKNOWN_HIGH_RISK))


@pytest.mark.parametrize(
    ("sources", "flag"),
    [
        ([BurnedIn.NO, BurnedIn.NO], "NO"),
        ([BurnedIn.NO, BurnedIn.YES], "YES"),
        ([BurnedIn.NO, BurnedIn.UNKNOWN_HIGH_RISK], "YES"),
        ([BurnedIn.NO, BurnedIn.UNKNOWN], None),  # unknown stays unknown, never NO
        ([BurnedIn.UNKNOWN], None),
        ([], None),
    ],
)
def test_inherited_flag_is_never_no_when_unknown(sources: list[BurnedIn], flag) -> None:
    assert inherited_flag(sources) == flag
