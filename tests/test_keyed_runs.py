"""Readers of keyed (schema 2.0) runs: no path in the run folder, so export and report find the
source files through the screened archive (keys recomputed) or the screening crosswalk, and say
clearly what to give when neither is there. 1.0 runs (files named by path) still read."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from run_factory import build_run
from typer.testing import CliRunner

from pdd_batch.cli.app import app
from pdd_batch.ingest import keys
from pdd_batch.ingest.discovery import discover
from pdd_batch.review.export import ExportError, ExportOptions, export_run
from pdd_batch.review.overlay import SourceLocator, SourceNotFoundError
from pdd_batch.runs.crosswalk import write_crosswalk
from pdd_batch.runs.results import open_run
from pdd_batch.runs.schema import LEGACY_VERSION, SCHEMA_VERSION


@pytest.fixture(scope="module")
def keyed(tmp_path_factory: pytest.TempPathFactory):
    return build_run(tmp_path_factory.mktemp("keyed"), schema_version=SCHEMA_VERSION)


def test_keyed_run_folder_holds_no_path(keyed) -> None:
    res = open_run(keyed.run_dir)
    assert not res.legacy_paths and res.key_id == keys.site_key().key_id
    assert res.archive_root is None
    rels = [p.relative_to(keyed.archive).as_posix() for ps in keyed.files.values() for p in ps]
    assert set(res.slices.column("file_key").to_pylist()) == {keys.file_key(r) for r in rels}
    blobs = b"".join(p.read_bytes() for p in keyed.run_dir.rglob("*") if p.is_file())
    for rel in rels:
        for part in rel.split("/"):
            assert part.encode() not in blobs, part
    assert str(keyed.archive).encode() not in blobs


def test_legacy_run_reads_paths_as_file_keys(tmp_path: Path) -> None:
    run = build_run(tmp_path, with_nifti=False)
    assert run.schema_version == LEGACY_VERSION
    assert "source_file" in pq.read_table(run.run_dir / "slices").column_names
    res = open_run(run.run_dir)
    assert res.legacy_paths and res.key_id is None
    rels = {p.relative_to(run.archive).as_posix() for ps in run.files.values() for p in ps}
    assert set(res.slices.column("file_key").to_pylist()) == rels
    assert res.errors.column("file_key").to_pylist() == ["junk/notdicom.dcm"]
    assert SourceLocator.for_run(res).root == run.archive  # the manifest's archive root


def test_export_of_keyed_run_needs_the_archive_and_finds_every_file(keyed, tmp_path) -> None:
    res = open_run(keyed.run_dir)
    with pytest.raises(ExportError, match="--archive"):
        export_run(res, tmp_path / "none", ExportOptions(top=3))
    every = ExportOptions(min_score=-1e9)  # every study, whatever its outcome
    summary = export_run(res, tmp_path / "out", every, keyed.locator())
    assert not summary.errors, summary.errors
    assert summary.n_files == sum(len(v) for v in keyed.files.values())
    assert summary.n_overlays >= 3


def test_crosswalk_locates_files_and_must_match_the_run(keyed, tmp_path: Path) -> None:
    res = open_run(keyed.run_dir)
    cw = write_crosswalk(tmp_path / "cw.json", discover(keyed.archive), res.key_id)
    by_walk = keyed.locator().paths
    by_cw = SourceLocator.for_run(res, crosswalk=cw)
    assert by_cw.root == keyed.archive.resolve()
    assert {k: by_cw.path(k) for k in by_walk} == by_walk
    stale = write_crosswalk(tmp_path / "stale.json", discover(keyed.archive), "000000000000")
    with pytest.raises(SourceNotFoundError, match="not this run's crosswalk"):
        SourceLocator.for_run(res, crosswalk=stale)


def test_another_site_key_is_named_not_silently_unmatched(
    keyed, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(keys.KEY_FILE_ENV, str(tmp_path / "other" / "site.key"))
    keys.clear_cache()
    try:
        with pytest.raises(SourceNotFoundError, match="site key"):
            SourceLocator.for_run(open_run(keyed.run_dir), archive=keyed.archive)
    finally:
        monkeypatch.undo()
        keys.clear_cache()


def _thumbs(page: Path) -> list[str]:
    return re.findall(r'src="(data:image/png;base64,[^"]+)"', page.read_text())


def test_cli_report_and_export_ask_for_the_archive(keyed, tmp_path: Path) -> None:
    runner = CliRunner()
    page = tmp_path / "r.html"
    missing = runner.invoke(app, ["report", str(keyed.run_dir), "--out", str(page)])
    assert missing.exit_code == 2 and "--archive" in missing.output and not page.exists()
    alone = runner.invoke(
        app, ["report", str(keyed.run_dir), "--out", str(page), "--heatmaps-only"]
    )
    assert alone.exit_code == 0, alone.output
    heat_only = _thumbs(page)
    ok = runner.invoke(
        app, ["report", str(keyed.run_dir), "--out", str(page), "--archive", str(keyed.archive)]
    )
    assert ok.exit_code == 0, ok.output
    drawn = _thumbs(page)
    assert len(drawn) == len(heat_only) == 2
    assert drawn != heat_only  # thumbnails now drawn over the source slices
    out = tmp_path / "exp"
    no_arch = runner.invoke(app, ["export", str(keyed.run_dir), "--out", str(out)])
    assert no_arch.exit_code == 2 and "--archive" in no_arch.output
    exp = runner.invoke(
        app,
        ["export", str(keyed.run_dir), "--out", str(out), "--archive", str(keyed.archive)],
    )
    assert exp.exit_code == 0, exp.output


def test_error_reasons_never_carry_a_path(tmp_path: Path) -> None:
    """Discovery and read reasons quote the file (``DOE^JOHN/x.dcm: bad header``): the errors
    table names it by key and the reason with ``<file>``."""
    from pdd_batch.ingest.discovery import Discovery, FileRecord, SeriesRef
    from pdd_batch.runs.state import RunState
    from pdd_batch.runs.tables import error_rows

    bad, member = "DOE^JOHN_12345/x.dcm", "DOE^JOHN_12345/IM2.dcm"
    ref = SeriesRef("s1", "st1", "dicom", "CT", ("DOE^JOHN_12345/IM1.dcm", member))
    disc = Discovery(
        tmp_path,
        series=[ref],
        files=[FileRecord(bad, "failed", f"{bad}: bad header"),
               *(FileRecord(f, "used", "", "s1") for f in ref.files)],
    )  # fmt: skip
    failed = {"s1": f"SeriesReadError: {member}: truncated pixel data"}
    outcomes = {bad: "failed", ref.files[0]: "failed", member: "failed"}
    rows = error_rows(disc, RunState(tmp_path), failed, outcomes, run_id="r")
    assert {r["file_key"] for r in rows} == {keys.file_key(p) for p in outcomes}
    for r in rows:
        assert "DOE" not in r["reason"] and ".dcm" not in r["reason"], r["reason"]
        assert "<file>" in r["reason"]


def test_folder_keyed_otherwise_is_rescreened_whole(tmp_path: Path) -> None:
    """Rows keyed with another site key (or by a 1.0 run) cannot be matched with this run's
    keys: the run drops them and screens everything, instead of duplicating every series."""
    from pdd_batch.runs.lifecycle import rekey_needed as _rekey_needed
    from pdd_batch.runs.manifest import InputCounts, build_manifest, write_manifest
    from pdd_batch.runs.state import RunState, SeriesRecord

    state = RunState(tmp_path)
    assert not _rekey_needed(tmp_path, state, "abc")  # a new folder
    state.series["k"] = SeriesRecord("", 0, "fp", "st")
    counts = InputCounts.from_outcomes({})
    for recorded, expected in (("abc", False), ("other", True)):
        manifest = build_manifest(run_id="r", status="complete", key_id=recorded, counts=counts,
                                  model_id="m", checkpoint_hash="h")  # fmt: skip
        write_manifest(tmp_path, manifest)
        assert _rekey_needed(tmp_path, state, "abc") is expected
    legacy = {"run_id": "r", "archive_root": "/x", "schema_version": "1.0"}
    (tmp_path / "manifest.json").write_text(json.dumps(legacy))
    assert _rekey_needed(tmp_path, state, "abc")
