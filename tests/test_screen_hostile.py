"""A screen of the hostile archive (``hostile_factory``) on a real local Ray cluster: exit 0,
every file accounted for, the good series scored whole beside its bad copies (issue 16)."""

from __future__ import annotations

from pathlib import Path

import pyarrow.parquet as pq
import pytest
from hostile_factory import build_hostile_archive
from screen_support import make_checkpoint

from jobs.screen import run_screen
from pdd_batch.ingest.keys import file_key
from pdd_batch.runs.config import RunConfig

pytestmark = [pytest.mark.ray, pytest.mark.slow]


def test_hostile_archive_screens_with_every_file_accounted_for(tmp_path: Path, shared_ray) -> None:
    built = build_hostile_archive(tmp_path / "archive")
    ckpt = make_checkpoint(tmp_path / "ckpt")
    out = tmp_path / "run"
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
    # the instance only the read stage finds bad: left out of its series, one failed row
    for rel in built["undecodable"]:
        row = by_file.loc[key[rel]]
        assert row["stage"] == "read" and row["status"] == "failed" and "left out" in row["reason"]
    for rel, status in built["expected"].items():
        if status != "used" and rel not in built["undecodable"]:
            assert by_file.loc[key[rel], "status"] == status, rel
    _assert_no_identifier_in_outputs(out, built, tmp_path / "archive")


def _assert_no_identifier_in_outputs(out: Path, built: dict, root: Path) -> None:
    """No file of the run names a hostile input (its path parts of 6+ characters: shorter ones
    here are words like "links" that the manifest's own keys contain; the archive's own path) or
    holds its patient identifiers and UIDs: Parquet values read as text, and raw bytes."""
    import pyarrow as pa

    secrets = set(built["identifiers"]) | {str(root)}
    for rel in built["paths"]:
        secrets.update(part for part in Path(rel.rstrip("/").replace("!", "/")).parts
                       if len(part) >= 6)  # fmt: skip
    secrets -= {"series", "slices", "errors", "studies"}  # the run's own folder names
    files = [p for p in out.rglob("*") if p.is_file()]
    assert files
    for path in files:
        texts = [path.read_bytes().decode("latin-1")]
        if path.suffix == ".parquet":
            table = pq.read_table(path)
            texts += [" ".join(map(str, table.column(c).to_pylist()))
                      for c in table.column_names
                      if not pa.types.is_binary(table.schema.field(c).type)]  # fmt: skip
        hits = sorted(s for s in secrets if any(s in t for t in texts))
        assert not hits, f"{path.relative_to(out)} names {hits[:5]}"
