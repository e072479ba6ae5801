"""`--force` on a folder that holds results: a run killed part-way (here: its progress callback
raises after it committed some series) leaves the earlier results readable by ``open_run``,
whole and unmixed; the next run finishes the new generation and only then replaces them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from dicom_factory import write_ct_series
from screen_support import make_checkpoint

from jobs.screen import run_screen
from pdd_batch.runs.config import RunConfig
from pdd_batch.runs.results import open_run
from pdd_batch.runs.state import RunState

pytestmark = [pytest.mark.ray, pytest.mark.slow]


class Killed(RuntimeError):
    """Stands for the process dying once some series of the new generation are committed."""


def _cfg(archive: Path, out: Path, ckpt: Path, **kw) -> RunConfig:
    return RunConfig(archive=archive, out_dir=out, model_path=ckpt, num_cpus=2, batch_size=4,
                     rows_per_file=4, flush_seconds=0.1, **kw)  # fmt: skip


def _sorted(table, key: str = "slice_key"):
    return table.sort_by(key).to_pandas()


def test_killed_force_run_leaves_earlier_results_readable(tmp_path: Path, shared_ray) -> None:
    archive, out = tmp_path / "archive", tmp_path / "out"
    for i in range(4):
        write_ct_series(archive / f"s{i}", n_slices=4, rows=32, cols=32, seed=300 + i)
    ckpt = make_checkpoint(tmp_path / "ckpt")
    events: list = []

    def kill_after_first_commit(event) -> None:
        events.append(event)
        if event.stage == "commit" and event.done >= 1:
            raise Killed("stopped after a commit")

    first = run_screen(_cfg(archive, out, ckpt, run_id="gen-1"))
    assert first.exit_code == 0 and not first.warnings
    before = open_run(out)
    with pytest.raises(Killed):
        run_screen(_cfg(archive, out, ckpt, run_id="gen-2", force=True), kill_after_first_commit)
    assert RunState.load(out).parts  # some of the new generation was committed...
    after = open_run(out)  # ...and none of it is visible: the earlier results, whole
    assert _sorted(after.slices).equals(_sorted(before.slices))
    assert _sorted(after.studies, "study_key").equals(_sorted(before.studies, "study_key"))
    assert after.model_id == before.model_id and after.manifest["run_id"] == "gen-1"
    assert after.status == "failed" and after.manifest["in_progress"]["run_id"] == "gen-2"
    said = [e.note for e in events if e.stage == "warning"]
    assert len(said) == 1 and "--force" in said[0] and "16 slices" in said[0]
    resumed = run_screen(_cfg(archive, out, ckpt, run_id="gen-3"))
    assert resumed.exit_code == 0 and resumed.warnings  # it said what it replaces
    final = open_run(out)
    slices = final.slices.to_pandas()
    assert slices["slice_key"].is_unique and set(slices["slice_key"]) == set(
        before.slices["slice_key"].to_pylist()
    )
    assert set(slices["run_id"]) <= {"gen-2", "gen-3"} and "gen-3" in set(slices["run_id"])
    assert final.status == "complete" and "in_progress" not in final.manifest
    live = json.loads((out / "live_files.json").read_text())["tables"]
    for table in ("slices", "heatmaps", "studies"):  # the earlier generation's files are gone
        on_disk = sorted(f"{table}/{p.name}" for p in (out / table).iterdir())
        assert on_disk == sorted(live[table]), table
