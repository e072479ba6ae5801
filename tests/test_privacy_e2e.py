"""Issue 16 "done when": screen an archive built from real files (../shared/data/dicom when
present) plus generated series, all in folders named like patients, then grep EVERY output of the
run - each Parquet file read as text through pyarrow and as raw bytes, the JSON files, the run
state, the driver's and Ray's logs, the HTML report of ``pdd-batch report`` and the console output
of ``screen``/``summary``/``report`` - for the folder names, file names, patient names and the
original Study/Series/SOP Instance UIDs. None may appear. The opt-in crosswalk, kept outside the
run folder with mode 0600, holds them (the positive control: the grep can find them).
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import stat
import tempfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pydicom
import pytest
import ray
from conftest import SHARED
from dicom_factory import truncate_file, write_corrupt_dicom, write_ct_series, write_text
from ray_support import start_test_ray
from screen_support import make_checkpoint
from typer.testing import CliRunner

from pdd_batch.cli.app import app
from pdd_batch.ingest.keys import file_key

# ../shared or generated files only: .ci/run also runs it with ../shared hidden.
pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.fallback]

PATIENT_FOLDERS = ["DOE^JOHN_12345", "ROE^MARY_67890", "POE^EDGAR_24680", "LOVELACE^ADA_1815"]
MIN_BINARY = 6  # raw-byte greps of binary files use strings at least this long (no chance hits)


def _build_archive(root: Path) -> None:
    """Generated CT series (patient names in their headers) and bad files, and every dataset of
    ../shared/data/dicom when present, each under a patient-named folder."""
    write_ct_series(root / PATIENT_FOLDERS[0] / "CT_HEAD_Doe", n_slices=5, rows=32, cols=32,
                    patient_name="Doe^John", patient_id="MRN-12345-77", prefix="DOE_JOHN_",
                    seed=1)  # fmt: skip
    broken = write_ct_series(root / PATIENT_FOLDERS[1] / "MARY_CT", n_slices=3, rows=32, cols=32,
                             patient_name="Roe^Mary", patient_id="MRN-67890-88",
                             prefix="ROE_MARY_", seed=2)  # fmt: skip
    truncate_file(broken[1], keep_fraction=0.6)  # a failed file of its own, named by key only
    write_corrupt_dicom(root / PATIENT_FOLDERS[2] / "POE_EDGAR_corrupt.dcm")
    write_text(root / PATIENT_FOLDERS[2] / "notes_about_POE_EDGAR.txt")
    dicom = SHARED / "data" / "dicom"
    if dicom.is_dir():
        for i, dataset in enumerate(sorted(p for p in dicom.iterdir() if p.is_dir())):
            folder = PATIENT_FOLDERS[3] if i % 2 else PATIENT_FOLDERS[0]
            shutil.copytree(dataset, root / folder / dataset.name)
    for path in root.rglob("*"):  # copies of read-only files: let tmp_path clean them up
        path.chmod(0o700 if path.is_dir() else 0o600)


def _secrets(root: Path) -> tuple[set[str], dict[str, set[str]]]:
    """Strings that must never appear: every path component and file name, the patient names
    and IDs and the original UIDs of every DICOM file, and the archive's absolute path."""
    found: dict[str, set[str]] = {"paths": set(), "names": set(), "uids": set()}
    files = [p for p in root.rglob("*") if p.is_file()]
    for path in files:
        rel = path.relative_to(root)
        found["paths"].update(part for part in rel.parts if len(part) >= 4)
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
        except Exception:  # noqa: BLE001 - not DICOM: only its path is secret
            continue
        for tag in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"):
            if ds.get(tag):
                found["uids"].add(str(ds.get(tag)))
        name, pid = str(ds.get("PatientName", "")), str(ds.get("PatientID", ""))
        found["names"].update(s for s in (name, pid) if len(s) >= 5)
        found["names"].update(p for p in re.split(r"[\^ ]", name) if len(p) >= 6)
    found["paths"].add(str(root))
    return {str(p.relative_to(root)) for p in files}, found


def _assert_absent(text: str, secrets: dict[str, set[str]], where: str, min_len: int = 0) -> None:
    for kind, values in secrets.items():
        hits = sorted(v for v in values if len(v) >= min_len and v in text)
        assert not hits, f"{kind} found in {where}: {hits[:5]}"


def _parquet_text(path: Path) -> str:
    """Every non-binary value of a Parquet file as text, plus its schema metadata."""
    table = pq.read_table(path)
    parts = [str(table.schema.metadata)]
    for name in table.column_names:
        if not pa.types.is_binary(table.schema.field(name).type):
            parts.append(" ".join(map(str, table.column(name).to_pylist())))
    return "\n".join(parts)


@pytest.fixture
def ray_private():
    temp = tempfile.mkdtemp(prefix="rt")  # short: Ray's socket paths must stay < 108 chars
    start_test_ray(num_cpus=2, _temp_dir=temp)  # a cluster of its own, token auth
    yield Path(temp)
    ray.shutdown()
    shutil.rmtree(temp, ignore_errors=True)


def test_no_path_name_or_uid_in_any_output(tmp_path: Path, ray_private: Path, caplog) -> None:
    caplog.set_level(logging.INFO)
    archive, out = tmp_path / "archive", tmp_path / "run"
    _build_archive(archive)
    rels, secrets = _secrets(archive)
    assert {"DOE^JOHN_12345", "ROE_MARY_0002.dcm"} <= secrets["paths"] and secrets["uids"]
    ckpt = make_checkpoint(tmp_path / "ckpt", threshold=0.0)  # every study flagged
    crosswalk = tmp_path / "private" / "crosswalk.json"
    runner = CliRunner(env={"COLUMNS": "400"})  # no wrapped cells: a path split by rich hides
    screen = runner.invoke(app, ["screen", str(archive), "--out", str(out), "--model", str(ckpt),
                                 "--batch-size", "16", "--crosswalk", str(crosswalk)])  # fmt: skip
    assert screen.exit_code == 0, screen.output
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["inputs_seen"] == len(rels) and manifest["inputs_lost"] == 0
    summary = runner.invoke(app, ["summary", str(out)])
    page = tmp_path / "report.html"
    report = runner.invoke(app, ["report", str(out), "--out", str(page),
                                 "--archive", str(archive)])  # fmt: skip
    assert report.exit_code == 0, report.output

    # positive control: the crosswalk (private, outside the run) holds what the outputs may not
    assert stat.S_IMODE(crosswalk.stat().st_mode) == 0o600
    cw_text = crosswalk.read_text()
    assert all(uid in cw_text for uid in secrets["uids"])
    assert all(json.dumps(rel)[1:-1] in cw_text for rel in rels)
    errors = pq.read_table(out / "errors").to_pandas().set_index("file_key")
    trunc = errors.loc[file_key(f"{PATIENT_FOLDERS[1]}/MARY_CT/ROE_MARY_0002.dcm")]
    # cut mid-pixel-data: failed on its own (at discovery since its pixels are checked there)
    assert trunc["status"] == "failed" and trunc["reason"]
    assert "ROE_MARY" not in trunc["reason"] and "MARY_CT" not in trunc["reason"]

    outputs = [p for p in out.rglob("*") if p.is_file()]
    assert any(p.suffix == ".parquet" for p in outputs) and (out / "_state" / "run.db") in outputs
    for path in outputs:
        raw = path.read_bytes()
        where = str(path.relative_to(out))
        if path.suffix == ".parquet":
            _assert_absent(_parquet_text(path), secrets, where + " (as text)")
            _assert_absent(raw.decode("latin-1"), secrets, where + " (bytes)", MIN_BINARY)
        else:
            _assert_absent(raw.decode("utf-8", "replace"), secrets, where)
    html = re.sub(r"data:image/png;base64,[A-Za-z0-9+/=]+", "", page.read_text())
    assert "data:image" not in html and "<figure>" in html
    _assert_absent(html, secrets, "report.html")
    for name, result in (("screen", screen), ("summary", summary), ("report", report)):
        _assert_absent(result.output, secrets, f"`{name}` console output")
    _assert_absent(caplog.text, secrets, "driver log")
    logs = [
        p for p in ray_private.rglob("*") if p.is_file() and p.suffix in (".log", ".out", ".err")
    ]
    assert logs
    for path in logs:
        _assert_absent(path.read_text("utf-8", "replace"), secrets, f"Ray log {path.name}")
