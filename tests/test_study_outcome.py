"""The study outcome (``pdd_batch.runs.outcome``): flagged, normal, or not_assessed with its
reason, one row per study and model; older runs read with the same meaning; the review queue."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pdd_batch.runs.config import RunConfig, RunConfigError
from pdd_batch.runs.outcome import study_rows
from pdd_batch.runs.results import open_run
from pdd_batch.runs.schema import LEGACY_TABLES, SLICES_SCHEMA, TABLES


def _rows(study: str, ood: list[bool | None], flagged: list[bool], **extra) -> list[dict]:
    model = extra.get("model_id", "m")
    threshold = extra.get("threshold", 1.0)
    return [
        {
            "study_key": study,
            "series_key": f"{study}-{model}",
            "slice_key": f"{study}-{model}:{i}",
            "score": 10.0 - i,
            "flagged": f,
            "threshold": threshold,
            "modality": "CT",
            "model_id": model,
            "checkpoint_hash": f"hash-{model}",
            "out_of_distribution": o,
        }
        for i, (o, f) in enumerate(zip(ood, flagged, strict=True))
    ]


def _outcomes(table: pa.Table, **kw) -> dict[tuple[str, str], dict]:
    out = study_rows(table, topk=2, run_id="r", **kw).to_pylist()
    return {(r["study_key"], r["model_id"]): r for r in out}


def test_a_study_with_most_slices_out_of_distribution_is_not_assessed_never_normal() -> None:
    mostly_ood = _rows("a", [True, True, True, False], [False] * 4)
    got = _outcomes(pa.Table.from_pylist(mostly_ood))[("a", "m")]
    assert got["decision"] == "not_assessed"
    assert got["n_assessed"] == 1 and got["n_out_of_distribution"] == 3
    assert "3/4 slices out of distribution" in got["reason"]
    relaxed = _outcomes(pa.Table.from_pylist(mostly_ood), min_assessed=0.25)[("a", "m")]
    assert relaxed["decision"] == "normal" and relaxed["reason"] is None


def test_three_outcomes_with_reasons() -> None:
    table = pa.Table.from_pylist(
        _rows("flag", [True, True, False], [False, False, True])  # a finding stays a finding
        + _rows("norm", [False, False, True], [False] * 3)  # 2/3 assessed
        + _rows("none", [True, True], [False, False])  # nothing assessed
        + _rows("nochk", [None, None], [False, False])  # no check: every slice assessed
        + _rows("uncal", [False, False], [False, False], threshold=None)
    )
    got = {k[0]: (r["decision"], r["reason"]) for k, r in _outcomes(table).items()}
    assert got["flag"] == ("flagged", None)
    assert got["norm"] == ("normal", None)
    assert got["none"][0] == "not_assessed" and got["none"][1].startswith("2/2 slices")
    assert got["nochk"] == ("normal", None)
    assert got["uncal"][0] == "not_assessed" and "not calibrated" in got["uncal"][1]


def test_one_row_per_study_and_model_with_that_models_threshold() -> None:
    table = pa.Table.from_pylist(
        _rows("s", [False, False], [True, False], model_id="head", threshold=4.5)
        + _rows("s", [False], [False], model_id="chest", threshold=2.9)
    )
    got = _outcomes(table)
    assert set(got) == {("s", "head"), ("s", "chest")}
    assert got[("s", "head")]["decision"] == "flagged"
    assert got[("s", "chest")]["decision"] == "normal"
    assert got[("s", "head")]["threshold"] == pytest.approx(4.5)
    assert got[("s", "chest")]["threshold"] == pytest.approx(2.9)
    assert got[("s", "chest")]["checkpoint_hash"] == "hash-chest"


def test_min_assessed_is_a_share_recorded_in_the_run_config(tmp_path: Path) -> None:
    cfg = RunConfig(archive=tmp_path, out_dir=tmp_path / "o", min_assessed=0.8)
    assert cfg.to_dict()["min_assessed"] == 0.8
    assert RunConfig(archive=tmp_path, out_dir=tmp_path).min_assessed == 0.5
    for bad in (0.0, 1.5, -0.1):
        with pytest.raises(RunConfigError, match="min_assessed"):
            RunConfig(archive=tmp_path, out_dir=tmp_path / "o", min_assessed=bad)


def _write(run: Path, name: str, rows: list[dict], schema: pa.Schema) -> None:
    (run / name).mkdir(parents=True, exist_ok=True)
    table = pa.Table.from_pylist(rows, schema=schema)
    pq.write_table(table, run / name / f"{name}.parquet")


def _slice_row(study: str, z: int, *, ood: bool, score: float, flagged: bool) -> dict:
    return {
        "schema_version": "2.0",
        "slice_key": f"{study}:0:{z}",
        "study_key": study,
        "series_key": study,
        "volume_index": 0,
        "slice_index": z,
        "file_key": f"f{study}{z}",
        "score": score,
        "threshold": 1.0,
        "flagged": flagged,
        "model_id": "m",
        "checkpoint_hash": "h",
        "preprocessing": "{}",
        "run_id": "old",
        "code_version": "0",
        "out_of_distribution": ood,
    }


def _old_study(study: str, n: int, n_flagged: int, decision: str) -> dict:
    return {
        "schema_version": "2.0",
        "study_key": study,
        "n_series": 1,
        "n_slices": n,
        "max_score": 2.0,
        "topk_mean": 1.0,
        "n_flagged": n_flagged,
        "decision": decision,
        "model_id": "m",
        "checkpoint_hash": "h",
        "run_id": "old",
    }


def _old_run(tmp_path: Path) -> Path:
    """A 2.0 run: study "a" has 3 of 4 slices out of distribution and was called normal."""
    run = tmp_path / "run"
    old_studies = pa.schema(
        [f for f in TABLES["studies"] if f.name in LEGACY_TABLES["studies"].names]
    )
    slices = [_slice_row("a", z, ood=z < 3, score=0.5, flagged=False) for z in range(4)]
    slices += [_slice_row("b", z, ood=False, score=0.5 + z, flagged=z == 1) for z in range(2)]
    slices += [_slice_row("c", z, ood=True, score=0.5, flagged=False) for z in range(2)]
    _write(run, "slices", slices, SLICES_SCHEMA)
    studies = [
        _old_study("a", 4, 0, "normal"),
        _old_study("b", 2, 1, "flagged"),
        _old_study("c", 2, 0, "out_of_distribution"),
    ]
    _write(run, "studies", studies, old_studies)
    (run / "manifest.json").write_text(json.dumps({"status": "complete", "run_id": "old"}))
    return run


def test_a_run_written_before_the_outcome_is_read_with_it(tmp_path: Path) -> None:
    """A 2.0 run called a mostly out-of-distribution study normal: read today, it is not."""
    res = open_run(_old_run(tmp_path))
    got = {r["study_key"]: r for r in res.studies.to_pylist()}
    assert {k: r["decision"] for k, r in got.items()} == {
        "a": "not_assessed",
        "b": "flagged",
        "c": "not_assessed",
    }
    assert got["a"]["n_out_of_distribution"] == 3 and got["a"]["n_assessed"] == 1
    assert got["c"]["reason"].startswith("2/2 slices out of distribution")
    counts = res.counts()
    assert counts["flagged_studies"] == 1 and counts["not_assessed_studies"] == 2
    assert counts["normal_studies"] == 0 and counts["ood_slices"] == 5
    queue = res.review_queue().column("study_key").to_pylist()
    assert queue[0] == "b" and sorted(queue[1:]) == ["a", "c"]
    assert res.flagged_studies(top=2).column("decision").to_pylist() == [
        "flagged",
        "not_assessed",
    ]


def test_summary_lists_the_review_queue_with_each_outcome_and_reason(tmp_path: Path) -> None:
    from rich.console import Console

    from pdd_batch.cli.summary_view import render_summary

    console = Console(record=True, width=220)
    render_summary(console, _old_run(tmp_path))
    text = console.export_text()
    assert "Review queue" in text
    assert "not_assessed: 3/4 slices out of distribution" in text
    assert "not_assessed: 2/2 slices out of distribution" in text
    counts = {
        line.split("│")[1].strip(): line.split("│")[2].strip()
        for line in text.splitlines()
        if line.count("│") == 3
    }
    assert counts["flagged"] == "1" and counts["not assessed"] == "2" and counts["normal"] == "0"


def test_summary_command_exit_status_is_the_runs_not_the_findings(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from pdd_batch.cli.app import app

    run = _old_run(tmp_path)
    counts = {"inputs_seen": 8, "inputs_scored": 8, "inputs_skipped": 0, "inputs_failed": 0}
    manifest = {"status": "complete", "run_id": "old", "exit_code": 0, **counts}
    (run / "manifest.json").write_text(json.dumps(manifest))
    result = CliRunner(env={"COLUMNS": "200"}).invoke(app, ["summary", str(run)])
    assert "not_assessed: 3/4 slices out of distribution" in result.output
    assert result.exit_code == 0  # two studies not assessed, one flagged: still a good run
    manifest.update(status="incomplete", exit_code=1)
    (run / "manifest.json").write_text(json.dumps(manifest))
    assert CliRunner().invoke(app, ["summary", str(run)]).exit_code == 1


def test_a_run_with_only_normal_studies_has_an_empty_review_queue(tmp_path: Path) -> None:
    """Nothing to review is an empty queue (and a summary), not an error."""
    from rich.console import Console

    from pdd_batch.cli.summary_view import render_summary

    run = tmp_path / "run"
    old_studies = pa.schema(
        [f for f in TABLES["studies"] if f.name in LEGACY_TABLES["studies"].names]
    )
    slices = [_slice_row("a", z, ood=False, score=0.5, flagged=False) for z in range(3)]
    _write(run, "slices", slices, SLICES_SCHEMA)
    _write(run, "studies", [_old_study("a", 3, 0, "normal")], old_studies)
    (run / "manifest.json").write_text(json.dumps({"status": "complete", "run_id": "old"}))
    res = open_run(run)
    assert res.review_queue().num_rows == 0
    assert res.flagged_studies(top=5).num_rows == 0
    console = Console(record=True, width=220)
    render_summary(console, run)
    assert "normal" in console.export_text()
