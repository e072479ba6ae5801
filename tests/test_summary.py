"""The run reader (`pdd_batch.runs.results`) and the rich summary (`summary_view`, `summary`)."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from rich.console import Console
from run_factory import build_run
from typer.testing import CliRunner

from pdd_batch.cli.app import app
from pdd_batch.cli.summary_view import render_summary
from pdd_batch.runs.results import ResultsError, open_run
from pdd_batch.runs.schema import ERRORS_SCHEMA, SLICES_SCHEMA


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory):
    return build_run(tmp_path_factory.mktemp("summary"))


def test_open_run_reads_tables_and_manifest(run) -> None:
    res = open_run(run.run_dir)
    assert res.slices.num_rows == 4 + 4 + 3
    assert res.studies.num_rows == 3
    assert res.errors.num_rows == 1
    assert res.slices.schema.names[: len(SLICES_SCHEMA)] == SLICES_SCHEMA.names
    assert res.archive_root == run.archive
    assert res.status == "completed"
    assert res.model_id == "pdd-test"
    counts = res.counts()
    assert counts["flagged_studies"] == 2 and counts["flagged_slices"] == 3
    assert counts["series"] == 3


def test_flagged_studies_selection(run) -> None:
    res = open_run(run.run_dir)
    flagged = res.flagged_studies()
    assert flagged.column("decision").to_pylist() == ["flagged", "flagged"]
    scores = flagged.column("max_score").to_pylist()
    assert scores == sorted(scores, reverse=True)
    assert res.flagged_studies(top=3).num_rows == 3  # top N ignores the decision
    assert res.flagged_studies(top=1).column("study_key").to_pylist() == [run.study_keys[0]]
    above = res.flagged_studies(min_score=0.5).column("max_score").to_pylist()
    assert above and min(above) >= 0.5 and len(above) == 2
    assert res.flagged_studies(top=1, min_score=5.0).num_rows == 0
    with pytest.raises(ResultsError, match="top"):
        res.flagged_studies(top=-1)
    top = res.top_slices(run.study_keys[0], k=2, flagged_only=True)
    assert top.column("slice_index").to_pylist() == [1, 2]


def test_absent_tables_are_empty_with_schema(tmp_path: Path) -> None:
    (tmp_path / "slices").mkdir()
    (tmp_path / "manifest.json").write_text(json.dumps({"status": "running"}))
    res = open_run(tmp_path)
    assert res.slices.num_rows == 0 and res.slices.schema.names == SLICES_SCHEMA.names
    assert res.errors.schema.names == ERRORS_SCHEMA.names
    assert res.flagged_studies().num_rows == 0
    assert res.archive_root is None
    with pytest.raises(ResultsError, match="not found"):
        open_run(tmp_path / "nope")
    with pytest.raises(ResultsError, match="not a screening run"):
        open_run(tmp_path / "slices")


def test_missing_required_column_names_it(run, tmp_path: Path) -> None:
    bad = tmp_path / "bad"
    (bad / "studies").mkdir(parents=True)
    table = pq.read_table(run.run_dir / "studies" / "part-0.parquet").drop_columns(["max_score"])
    pq.write_table(table, bad / "studies" / "part-0.parquet")
    with pytest.raises(ResultsError, match="max_score"):
        open_run(bad)


def test_temp_files_of_atomic_writes_are_ignored(run, tmp_path: Path) -> None:
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(run.run_dir, copy)
    shutil.copy(copy / "slices" / "part-0.parquet", copy / "slices" / ".part-1.parquet.tmp")
    shutil.copy(copy / "slices" / "part-0.parquet", copy / "slices" / "_part-2.parquet")
    assert open_run(copy).slices.num_rows == 11


def test_render_summary_ranks_flagged_and_hides_identifiers(run) -> None:
    console = Console(record=True, width=160)
    code = render_summary(console, run.run_dir)
    text = console.export_text()
    assert code == 0
    assert "all inputs accounted for" in text
    keys = run.study_keys
    assert keys[0] in text and keys[2] in text
    assert text.index(keys[0]) < text.index(keys[2])  # 0.9 ranks above 0.7
    assert "not a DICOM or NIfTI file" in text
    for ident in run.identities:
        for s in ident.strings():
            assert s not in text
    for uid in run.uids:
        assert uid not in text
    for part in ("Doe", "Poe", "archive"):
        assert part not in text  # no source paths either


def test_summary_exit_code_when_inputs_missing(run, tmp_path: Path) -> None:
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(run.run_dir, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["inputs_seen"] += 2
    (copy / "manifest.json").write_text(json.dumps(manifest))
    console = Console(record=True, width=160)
    assert render_summary(console, copy) == 1
    assert "off by 2" in console.export_text()


def test_summary_command(run, tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["summary", str(run.run_dir)])
    assert result.exit_code == 0, result.output
    assert run.study_keys[0] in result.output
    result = CliRunner().invoke(app, ["summary", str(tmp_path / "missing")])
    assert result.exit_code == 2
    assert "not found" in result.output


def test_summary_uses_the_recorded_exit_code(run, tmp_path: Path) -> None:
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(run.run_dir, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest.update(status="failed", exit_code=2, timings={"total_s": 12.34}, slices_per_s=5.5)
    (copy / "manifest.json").write_text(json.dumps(manifest))
    console = Console(record=True, width=160)
    assert render_summary(console, copy) == 2
    text = console.export_text()
    assert "status: failed" in text and "time: 12.3 s, 5.5 slices/s" in text


def test_counts_keep_out_of_scope_and_skipped_inputs_apart_from_errors(tmp_path: Path) -> None:
    """Inputs outside every model's scope are skipped by design: counted on a row of their own,
    never under errors; unusable skipped inputs too; failed inputs are the errors."""
    import pyarrow as pa
    from run_factory import RUN_ID

    from pdd_batch.ingest import keys
    from pdd_batch.runs.schema import SCHEMA_VERSION

    run = build_run(tmp_path, schema_version=SCHEMA_VERSION)
    base = {"schema_version": SCHEMA_VERSION, "series_key": None, "run_id": RUN_ID}
    extra = [
        {**base, "file_key": keys.file_key(f"mr/{i}.dcm"), "stage": "discover",
         "status": "skipped", "reason": "outside every model's scope (MR, BRAIN)"}
        for i in range(3)
    ] + [{**base, "file_key": keys.file_key("notes.txt"), "stage": "discover",
          "status": "skipped", "reason": "not a DICOM or NIfTI file (.txt)"}]  # fmt: skip
    table = pa.Table.from_pylist(extra, schema=ERRORS_SCHEMA)
    pq.write_table(table, run.run_dir / "errors" / "part-1.parquet")
    manifest = json.loads((run.run_dir / "manifest.json").read_text())
    manifest["inputs_seen"] += len(extra)
    manifest["inputs_skipped"] += len(extra)
    (run.run_dir / "manifest.json").write_text(json.dumps(manifest))
    console = Console(record=True, width=160)
    assert render_summary(console, run.run_dir) == 0
    rows = {}
    for line in console.export_text().splitlines():
        cells = [c.strip() for c in line.strip("│ ").split("│")]
        if len(cells) == 2 and cells[1].isdigit():
            rows[cells[0]] = int(cells[1])
    errors = open_run(run.run_dir).errors.to_pylist()
    assert rows["failed inputs (errors)"] == sum(r["status"] == "failed" for r in errors) == 1
    assert rows["skipped inputs (not usable)"] == 1
    assert rows["inputs outside every model's scope (not screened)"] == 3
    assert "errors" not in rows  # no row counts every error-table row as an error


def test_counted_says_one_study_and_two_studies() -> None:
    from pdd_batch.cli.summary_view import counted

    assert [counted(n, "study", "studies") for n in (0, 1, 2)] == [
        "0 studies",
        "1 study",
        "2 studies",
    ]
    assert (
        counted(1, "input file") == "1 input file" and counted(3, "input file") == "3 input files"
    )
