"""A screen of the hostile archive (``hostile_factory``) on a real local Ray cluster: exit 0,
every file accounted for, the good series scored whole beside its bad copies (issue 16)."""

from __future__ import annotations

from pathlib import Path

import pyarrow.parquet as pq
import pytest
import ray
from hostile_factory import build_hostile_archive
from ray_support import start_test_ray
from screen_support import make_checkpoint

from jobs.screen import run_screen
from pdd_batch.ingest.keys import file_key
from pdd_batch.runs.config import RunConfig

pytestmark = [pytest.mark.ray, pytest.mark.slow]


def test_hostile_archive_screens_with_every_file_accounted_for(tmp_path: Path) -> None:
    built = build_hostile_archive(tmp_path / "archive")
    ckpt = make_checkpoint(tmp_path / "ckpt")
    out = tmp_path / "run"
    start_test_ray(num_cpus=2)
    try:
        result = run_screen(
            RunConfig(
                archive=tmp_path / "archive",
                out_dir=out,
                model_path=ckpt,
                batch_size=4,
                rows_per_file=16,
                open_archives=True,
            )
        )
    finally:
        ray.shutdown()
    m = result.manifest
    assert result.exit_code == 0 and m["status"] == "complete" and m["inputs_lost"] == 0
    assert m["inputs_seen"] == len(built["expected"])
    assert m["inputs_seen"] == m["inputs_scored"] + m["inputs_skipped"] + m["inputs_failed"]
    slices = pq.read_table(out / "slices").to_pandas()
    errors = pq.read_table(out / "errors").to_pandas()
    assert len(slices) == built["scored_slices"]
    key = {rel: file_key(rel) for rel in built["expected"]}  # outputs name files by key only
    assert set(errors["file_key"]) | set(slices["file_key"]) == set(key.values())
    assert errors["file_key"].is_unique
    assert len(errors) == m["inputs_skipped"] + m["inputs_failed"]
    # the good series is scored whole; each bad copy of its instances is one failed row
    assert {key[rel] for rel in built["good_series_files"]} <= set(slices["file_key"])
    by_file = errors.set_index("file_key")
    for rel in built["bad_instances"]:
        assert by_file.loc[key[rel], "status"] == "failed"
    # the instance only the read stage finds bad: left out of its series, one row of its own
    for rel in built["undecodable"]:
        row = by_file.loc[key[rel]]
        assert row["stage"] != "discover" and "left out" in row["reason"]
    for rel, status in built["expected"].items():
        if status != "used" and rel not in built["undecodable"]:
            assert by_file.loc[key[rel], "status"] == status, rel
