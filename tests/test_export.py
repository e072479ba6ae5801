"""`pdd-batch export`: de-identified copies, unchanged pixels, aligned overlays, crosswalk."""

from __future__ import annotations

import csv
import io
import json
import re
import shutil
import stat
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from PIL import Image
from run_factory import build_run
from typer.testing import CliRunner

from pdd_batch.cli.app import app
from pdd_batch.review.export import ExportError, ExportOptions, export_run
from pdd_batch.runs.results import open_run

NEW_UID = re.compile(r"^2\.25\.\d{1,39}$")


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory):
    base = tmp_path_factory.mktemp("export")
    run = build_run(base)
    out, cw = base / "out", base / "private" / "crosswalk.json"
    summary = export_run(
        open_run(run.run_dir), out, ExportOptions(secondary_capture=True, crosswalk=cw)
    )
    return run, out, cw, summary


def _forbidden(run) -> list[str]:
    values = [s for ident in run.identities for s in ident.strings()] + run.uids
    return values + run.study_keys + ["Doe/series", "Poe_Edgar", "archive"]


def test_nothing_identifying_in_any_exported_byte(exported) -> None:
    run, out, cw, summary = exported
    assert not summary.errors
    files = [p for p in out.rglob("*") if p.is_file()]
    assert len(files) >= 10
    for p in files:
        raw = p.read_bytes()
        if p.name.endswith(".gz"):
            import gzip

            raw = gzip.decompress(raw)
        for s in _forbidden(run):
            assert s.encode() not in raw, f"{p.relative_to(out)} holds an original identifier"


def test_dicom_elements_clean_and_pixels_unchanged(exported) -> None:
    run, out, cw, _ = exported
    walk = json.loads(cw.read_text())["studies"]
    forbidden = _forbidden(run)
    dicoms = [(f["exported"], f["source"]) for s in walk for f in s["files"]]
    dicoms = [(e, s) for e, s in dicoms if e.endswith(".dcm")]
    assert len(dicoms) == 4  # the flagged CT study
    study_uids = set()
    for exp, src in dicoms:
        ds = pydicom.dcmread(out / exp)
        orig = pydicom.dcmread(run.archive / src)
        assert ds.PixelData == orig.PixelData
        assert np.array_equal(ds.pixel_array, orig.pixel_array)
        for elem in [*ds.file_meta, *ds.iterall()]:
            assert not elem.tag.is_private
            if elem.VR != "SQ":
                assert not any(s in str(elem.value) for s in forbidden), elem.keyword
        assert ds.PatientIdentityRemoved == "YES"
        assert ds.DeidentificationMethodCodeSequence[0].CodeValue == "113100"
        assert NEW_UID.match(ds.StudyInstanceUID) and NEW_UID.match(ds.SOPInstanceUID)
        study_uids.add(ds.StudyInstanceUID)
    assert len(study_uids) == 1


def test_nifti_exported_with_header_text_stripped(exported) -> None:
    run, out, _, _ = exported
    (exp,) = list(out.glob("S*/nifti/*.nii.gz"))
    a, b = nib.load(run.files[run.study_keys[2]][0]), nib.load(exp)
    assert np.array_equal(np.asanyarray(a.dataobj), np.asanyarray(b.dataobj))
    assert b.header["descrip"].tobytes().strip(b"\x00") == b""


def test_manifest_csv_and_export_json(exported) -> None:
    run, out, _, summary = exported
    rows = list(csv.DictReader((out / "manifest.csv").open()))
    assert [r["export_id"] for r in rows] == ["S001", "S002"]
    assert [r["kind"] for r in rows] == ["dicom", "nifti"]
    assert float(rows[0]["max_score"]) >= float(rows[1]["max_score"])
    for r in rows:
        for f in r["files"].split(";") + r["overlays"].split(";"):
            assert (out / f).is_file()
    assert len(rows[0]["overlays"].split(";")) == 2  # one per flagged slice
    doc = json.loads((out / "export.json").read_text())
    assert doc["options"]["deidentify"] is True
    assert doc["options"]["secondary_capture"] is True
    assert doc["options"]["crosswalk"] is True and "private" not in json.dumps(doc)
    assert doc["counts"]["studies"] == 2 and doc["run"]["model_id"] == "pdd-test"


def test_crosswalk_is_private_and_complete(exported) -> None:
    run, out, cw, _ = exported
    assert stat.S_IMODE(cw.stat().st_mode) == 0o600
    entries = json.loads(cw.read_text())["studies"]
    first = entries[0]
    assert first["original_patient_id"] == run.identities[0].patient_id
    assert first["study_key"] == run.study_keys[0]
    assert (
        first["new_study_uid"]
        == pydicom.dcmread(out / first["files"][0]["exported"]).StudyInstanceUID
    )


def test_overlays_align_with_slice(exported) -> None:
    run, out, _, _ = exported
    res = open_run(run.run_dir)
    flagged = res.top_slices(run.study_keys[0], k=10, flagged_only=True).to_pylist()
    for row in flagged:
        png = out / "S001" / "overlays" / f"series01_v0_z{row['slice_index']:04d}.png"
        rgb = np.asarray(Image.open(png).convert("RGB")).astype(int)  # (H, W, 3)
        k = rgb.shape[0] // 64
        y, x = run.hot[row["slice_key"]]
        red = (rgb[..., 0] - rgb[..., 2]) > 80
        ys, xs = np.nonzero(red)
        assert abs(ys.mean() - (y - 0.5) * k) < k and abs(xs.mean() - (x - 0.5) * k) < k
        # the slice underneath: the dense dot (70 HU) sits at rows 30..33, cols 38..41 of the
        # 64x64 model grid (48 rows padded by 8); brain (30 HU) is darker, air is black
        grey = rgb.mean(axis=-1)
        dot = grey[31 * k : 33 * k, 39 * k : 41 * k].mean()
        brain = grey[40 * k : 42 * k, 20 * k : 22 * k].mean()
        assert dot > brain + 60 and brain > grey[: 2 * k, : 2 * k].mean() + 60


def test_secondary_capture_series(exported) -> None:
    run, out, _, _ = exported
    scs = sorted((out / "S001" / "secondary_capture").glob("*.dcm"))
    overlays = sorted((out / "S001" / "overlays").glob("*.png"))
    assert len(scs) == len(overlays) == 2
    image_uid = pydicom.dcmread(next((out / "S001" / "dicom").rglob("*.dcm"))).StudyInstanceUID
    series = set()
    for sc, png in zip(scs, overlays, strict=True):
        ds = pydicom.dcmread(sc)
        assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.7"
        assert ds.StudyInstanceUID == image_uid
        assert np.array_equal(ds.pixel_array, np.asarray(Image.open(png).convert("RGB")))
        series.add(ds.SeriesInstanceUID)
    assert len(series) == 1


def test_keep_identifiers_copies_bytes(tmp_path: Path) -> None:
    run = build_run(tmp_path, with_nifti=False)
    out = tmp_path / "out"
    export_run(open_run(run.run_dir), out, ExportOptions(deidentify=False, top=1))
    exported = sorted((out / "S001" / "dicom").rglob("*.dcm"))
    assert [p.read_bytes() for p in exported] == [
        p.read_bytes() for p in run.files[run.study_keys[0]]
    ]
    assert json.loads((out / "export.json").read_text())["options"]["deidentify"] is False


def test_selection_and_bad_options(tmp_path: Path) -> None:
    run = build_run(tmp_path)
    res = open_run(run.run_dir)
    s = export_run(res, tmp_path / "top3", ExportOptions(top=3))
    assert [x.study["study_key"] for x in s.studies] == [run.study_keys[0], run.study_keys[2],
                                                         run.study_keys[1]]  # fmt: skip
    assert len(s.studies[2].overlays) == 1  # no flagged slice: its top slice
    s = export_run(res, tmp_path / "min", ExportOptions(min_score=0.8))
    assert [x.study["study_key"] for x in s.studies] == [run.study_keys[0]]
    with pytest.raises(ExportError, match="not empty"):
        export_run(res, tmp_path / "min", ExportOptions())
    with pytest.raises(ExportError, match="crosswalk"):
        export_run(res, tmp_path / "o", ExportOptions(crosswalk=tmp_path / "o" / "cw.json"))
    with pytest.raises(ExportError, match="top"):
        ExportOptions(top=0)


def test_missing_source_is_an_error_record_and_export_goes_on(tmp_path: Path) -> None:
    run = build_run(tmp_path, with_nifti=False)
    run.files[run.study_keys[0]][1].unlink()
    s = export_run(open_run(run.run_dir), tmp_path / "out", ExportOptions())
    assert len(s.studies[0].files) == 3
    assert s.errors and s.errors[0]["reason"] == "source file not found"
    assert s.errors[0]["study"] == "S001" and "Doe" not in json.dumps(s.errors)
    doc = json.loads((tmp_path / "out" / "export.json").read_text())
    assert doc["counts"]["errors"] == len(s.errors)


def test_export_command(tmp_path: Path) -> None:
    run = build_run(tmp_path, with_nifti=False)
    out = tmp_path / "out"
    result = CliRunner().invoke(
        app, ["export", str(run.run_dir), "--out", str(out), "--top", "1", "--secondary-capture"]
    )
    assert result.exit_code == 0, result.output
    assert (out / "manifest.csv").is_file() and list(out.rglob("SC0001.dcm"))
    assert "exported 1 study, " in result.output  # not "1 studies"
    again = CliRunner().invoke(app, ["export", str(run.run_dir), "--out", str(out)])
    assert again.exit_code == 2 and "not empty" in again.output
    shutil.rmtree(out)


def test_export_command_allow_burned_in(tmp_path: Path) -> None:
    run = build_run(tmp_path, with_nifti=False)
    _set_header(run.files[run.study_keys[0]], BurnedInAnnotation="YES")
    args = ["export", str(run.run_dir), "--top", "1"]
    held = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "a")])
    assert held.exit_code == 0, held.output
    assert "withheld" in held.output and "--allow-burned-in" in held.output
    assert not list((tmp_path / "a").rglob("*.dcm"))
    allowed = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "b"), "--allow-burned-in"])
    assert allowed.exit_code == 0, allowed.output
    assert "BurnedInAnnotation=YES" in allowed.output
    assert len(list((tmp_path / "b").rglob("*.dcm"))) == 4


def test_overlay_base_matches_the_screening_reader(tmp_path: Path) -> None:
    """The direct file reader used as a fallback rebuilds the same model input as the series
    reader that screening uses (where that reader is present in this build)."""
    pytest.importorskip("pdd_batch.ingest.slicing")
    from pdd_batch.review import overlay

    run = build_run(tmp_path)
    res = open_run(run.run_dir)
    locator = run.locator()
    for key in run.study_keys:
        rows = locator.attach(res.study_slices(key).to_pylist())
        via_reader = overlay.model_input_slices(run.archive, rows)
        spec = overlay.spec_from_json(rows[0]["preprocessing"])
        for r in rows:
            path = run.archive / r["source_file"]
            direct = (
                overlay._nifti_slice(path, 0, r["slice_index"], spec)
                if path.name.endswith(".nii.gz")
                else overlay._dicom_slice(path, spec)
            )
            assert np.abs(via_reader[(0, r["slice_index"])] - direct).max() < 1e-5


@pytest.mark.parametrize("modality", ["CT"])
def test_overlay_base_of_monochrome1_matches_the_screening_reader(tmp_path: Path, modality) -> None:
    """MONOCHROME1 CT keeps its HU window, not inverted (the fallback normalises MR per slice,
    the series reader per volume, so only CT is compared)."""
    from dicom_factory import write_ct_series

    from pdd_batch.ingest.discovery import discover
    from pdd_batch.ingest.preprocess import PreprocessSpec
    from pdd_batch.ingest.slicing import iter_model_slices
    from pdd_batch.ingest.volume import load_series
    from pdd_batch.review import overlay

    write_ct_series(
        tmp_path / "s", n_slices=4, rows=32, cols=32, modality=modality, monochrome1=True
    )
    found = discover(tmp_path / "s")
    spec = PreprocessSpec(image_size=32)
    (ref,) = found.series
    for sl in iter_model_slices(load_series(found.root, ref), spec):
        direct = overlay._dicom_slice(found.root / sl.source_file, spec)
        assert np.abs(sl.image - direct).max() < 1e-4, (modality, sl.slice_index)


def test_sources_inside_a_zip_archive(tmp_path: Path) -> None:
    import zipfile

    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    run = build_run(tmp_path, with_nifti=False)
    with zipfile.ZipFile(run.archive / "batch.zip", "w") as zf:
        for p in run.files[run.study_keys[0]]:
            zf.write(p, p.relative_to(run.archive).as_posix())
            p.unlink()
    part = run.run_dir / "slices" / "part-0.parquet"
    table = pq.read_table(part)
    col = table.schema.get_field_index("source_file")
    zipped = pc.binary_join_element_wise("batch.zip!", table.column("source_file"), "")
    pq.write_table(table.set_column(col, table.schema.field(col), zipped.cast(pa.string())), part)
    s = export_run(open_run(run.run_dir), tmp_path / "out", ExportOptions(top=1))
    assert not s.errors and len(s.studies[0].files) == 4
    with zipfile.ZipFile(run.archive / "batch.zip") as zf:
        first = pydicom.dcmread(io.BytesIO(zf.read(zf.namelist()[0])))
    exported = pydicom.dcmread(tmp_path / "out" / s.studies[0].files[0])
    assert exported.PixelData == first.PixelData and exported.PatientIdentityRemoved == "YES"


def _set_header(paths: list[Path], **attrs) -> None:
    for src in paths:
        ds = pydicom.dcmread(src)
        for kw, value in attrs.items():
            setattr(ds, kw, value)
        ds.save_as(src)


def test_burned_in_yes_withheld_by_default_and_exported_when_allowed(tmp_path: Path) -> None:
    """A file declaring BurnedInAnnotation=YES is not written (pixels are never cleaned), and
    neither is the overlay built from its slice; both are listed as withheld. With
    allow_burned_in it is written, pixels unchanged, with a warning."""
    run = build_run(tmp_path, with_nifti=False)
    paths = run.files[run.study_keys[0]]
    _set_header(paths[1:2], BurnedInAnnotation="YES")  # slice 1: a flagged slice
    res = open_run(run.run_dir)
    s = export_run(res, tmp_path / "out", ExportOptions(top=1, secondary_capture=True))
    (study,) = s.studies
    held = "S001/dicom/series01/IM0002.dcm"
    assert held not in study.files and len(study.files) == 3
    assert not (tmp_path / "out" / held).exists() and not s.errors and not s.warnings
    assert study.withheld == [held, "S001/overlays/series01_v0_z0001.png"]
    assert study.overlays == ["S001/overlays/series01_v0_z0002.png"]
    assert len(study.secondary_capture) == 1  # only the overlay of a slice without the flag
    doc = json.loads((tmp_path / "out" / "export.json").read_text())
    assert doc["counts"]["withheld"] == 2 and doc["options"]["allow_burned_in"] is False
    assert {w["reason"] for w in doc["withheld"]} == {"withheld: possible burned-in text"}
    assert [w["item"] for w in doc["withheld"]] == study.withheld
    (row,) = csv.DictReader((tmp_path / "out" / "manifest.csv").open())
    assert row["withheld"].split(";") == study.withheld
    assert row["withheld_reason"] == "withheld: possible burned-in text"

    allowed = export_run(res, tmp_path / "all", ExportOptions(top=1, allow_burned_in=True))
    (study,) = allowed.studies
    assert held in study.files and not study.withheld and len(study.overlays) == 2
    assert pydicom.dcmread(tmp_path / "all" / held).PixelData == pydicom.dcmread(paths[1]).PixelData
    assert [w["study"] for w in allowed.warnings] == ["S001"]
    doc = json.loads((tmp_path / "all" / "export.json").read_text())
    assert "BurnedInAnnotation=YES" in doc["warnings"][0]["warning"]
    assert doc["options"]["allow_burned_in"] is True and doc["counts"]["withheld"] == 0


@pytest.mark.parametrize(
    ("attrs", "withheld"),
    [
        ({"Modality": "US"}, True),  # no BurnedInAnnotation on a high-risk modality
        ({"Modality": "DX"}, True),
        ({"SOPClassUID": "1.2.840.10008.5.1.4.1.1.7"}, True),  # a Secondary Capture
        ({"ImageType": ["DERIVED", "SECONDARY", "SCREEN SAVE"]}, True),
        ({"Modality": "US", "BurnedInAnnotation": "NO"}, False),  # an explicit NO is trusted
        ({}, False),  # CT without the flag
    ],
)
def test_possible_burned_in_text_on_high_risk_files(tmp_path: Path, attrs, withheld) -> None:
    run = build_run(tmp_path, with_nifti=False)
    _set_header(run.files[run.study_keys[0]], **attrs)
    s = export_run(open_run(run.run_dir), tmp_path / "out", ExportOptions(top=1))
    (study,) = s.studies
    assert len(study.files) == (0 if withheld else 4)
    assert len(study.withheld) == (6 if withheld else 0)  # 4 files and 2 overlays
    assert len(study.overlays) == (0 if withheld else 2)
    assert not s.errors
    row = next(csv.DictReader((tmp_path / "out" / "manifest.csv").open()))
    assert bool(row["withheld"]) == withheld
    if withheld:  # still named by its pseudonyms, and the crosswalk can find the sources
        assert NEW_UID.match(row["new_study_uid"]) and row["new_patient_id"].startswith("PDD")
    kept = export_run(open_run(run.run_dir), tmp_path / "kept", ExportOptions(deidentify=False))
    assert not any(x.withheld for x in kept.studies)  # identifiers kept: nothing to withhold


def test_withheld_files_are_in_the_crosswalk(tmp_path: Path) -> None:
    run = build_run(tmp_path, with_nifti=False)
    paths = run.files[run.study_keys[0]]
    _set_header(paths, BurnedInAnnotation="YES")
    cw = tmp_path / "private" / "cw.json"
    export_run(open_run(run.run_dir), tmp_path / "out", ExportOptions(top=1, crosswalk=cw))
    (entry,) = json.loads(cw.read_text())["studies"]
    assert entry["files"] == []
    assert [w["source"] for w in entry["withheld"]] == [
        p.relative_to(run.archive).as_posix() for p in paths
    ]
    assert entry["original_patient_id"] == run.identities[0].patient_id


def test_malformed_values_are_not_quoted_in_logs_or_warnings(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """pydicom quotes invalid values ("Invalid value for VR UI: '...'") in warnings and logs:
    an archive's malformed UIDs and dates must not reach them during an export."""
    import logging
    import warnings

    from pydicom.dataelem import DataElement

    run = build_run(tmp_path, with_nifti=False)
    bad_uid, bad_date = "1.2.826.0.042.20210405.777", "2021.04.05"  # leading zero; dotted date
    for paths in run.files.values():
        for p in paths:
            ds = pydicom.dcmread(p)
            ds[0x00200052] = DataElement(0x00200052, "UI", bad_uid)  # FrameOfReferenceUID
            ds[0x00080021] = DataElement(0x00080021, "DA", bad_date)  # SeriesDate
            ds.save_as(p)
    caplog.set_level(logging.DEBUG)
    caplog.clear()  # only what the export says
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        summary = export_run(open_run(run.run_dir), tmp_path / "out", ExportOptions())
    assert summary.n_files > 0 and not summary.errors
    said = [r.getMessage() for r in caplog.records] + [str(w.message) for w in caught]
    for text in said:
        assert bad_uid not in text and bad_date not in text, text
