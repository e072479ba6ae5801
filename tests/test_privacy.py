"""Privacy checks that cut across modules: malformed headers must not carry values into reasons."""

from __future__ import annotations

from pathlib import Path

import pydicom
from dicom_factory import write_ct_series
from pydicom.dataelem import DataElement

from pdd_batch.ingest.discovery import discover

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


def test_secondary_capture_inherits_burned_in_annotation(tmp_path: Path) -> None:
    """The overlays blend the source pixels: the SC series inherits the sources' flag - YES
    where a source declares burned-in text, NO only where every source says NO, and left out
    (never NO) where the sources do not say (a CT without the flag, a NIfTI)."""
    from run_factory import build_run

    from pdd_batch.review.export import ExportOptions, export_run
    from pdd_batch.runs.results import open_run

    run = build_run(tmp_path)  # CT flagged, CT normal, NIfTI
    for key, flag in ((run.study_keys[0], "YES"), (run.study_keys[1], "NO")):
        for src in run.files[key]:
            ds = pydicom.dcmread(src)
            ds.BurnedInAnnotation = flag
            ds.save_as(src)

    def flags(name: str, **extra) -> dict[str, set]:
        # every study, the normal one too (``top`` takes the review queue only)
        options = ExportOptions(min_score=-1e9, secondary_capture=True, **extra)
        summary = export_run(open_run(run.run_dir), tmp_path / name, options)
        return {
            s.study["study_key"]: {
                pydicom.dcmread(tmp_path / name / p).get("BurnedInAnnotation")
                for p in s.secondary_capture
            }
            for s in summary.studies
        }

    allowed = flags("allowed", allow_burned_in=True)
    assert allowed == {run.study_keys[0]: {"YES"}, run.study_keys[1]: {"NO"},
                       run.study_keys[2]: {None}}  # fmt: skip
    held = flags("held")  # by default the overlays of a YES source are withheld with it
    assert held == {run.study_keys[0]: set(), run.study_keys[1]: {"NO"}, run.study_keys[2]: {None}}


def test_secondary_capture_uids_never_shared_between_exports(tmp_path: Path) -> None:
    """Without a study UID of its own (NIfTI kept identified), the SC series must not get a UID
    derived from the export rank alone: S002 of every export would be one study in a PACS,
    filing one patient's overlays under another's."""
    from run_factory import build_run

    from pdd_batch.review.export import ExportOptions, export_run
    from pdd_batch.runs.results import open_run

    options = ExportOptions(deidentify=False, secondary_capture=True)
    study_uids = []
    for name in ("a", "b"):
        run = build_run(tmp_path / name)
        summary = export_run(open_run(run.run_dir), tmp_path / name / "out", options)
        (nifti,) = [s for s in summary.studies if s.kind == "nifti"]
        assert nifti.secondary_capture
        sc = [pydicom.dcmread(tmp_path / name / "out" / p) for p in nifti.secondary_capture]
        ids = {(str(ds.StudyInstanceUID), str(ds.PatientID)) for ds in sc}
        assert len(ids) == 1
        study_uids.append(ids.pop())
    assert study_uids[0][0] != study_uids[1][0]  # study
    assert study_uids[0][1] != study_uids[1][1]  # patient: PACS merge patients by PatientID
