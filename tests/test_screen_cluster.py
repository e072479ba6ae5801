"""`pdd-batch screen --sample --address`: the bundled sample archive screened through the CLI on
a two-node Ray cluster (both nodes on this machine)."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pydicom
import pytest
from ray_support import local_cluster
from screen_support import make_checkpoint, make_scoped_checkpoint
from typer.testing import CliRunner

from jobs.cluster import ray_temp_dir
from pdd_batch.cli.app import app

pytestmark = [pytest.mark.ray, pytest.mark.slow]


@pytest.fixture(scope="module")
def two_nodes():
    """One two-node cluster for the module's tests: each CLI run joins it by ``--address`` (and
    leaves it running when it ends), as a site's runs join their cluster."""
    with local_cluster(nodes=2, cpus_per_node=1) as cluster:
        yield cluster


@pytest.mark.fallback  # .ci/run also runs it where Ray's default temp folder is absent
def test_cli_screens_the_sample_on_a_two_node_cluster(two_nodes, tmp_path: Path) -> None:
    # the test cluster's address file sits in the private temp folder, not Ray's /tmp/ray
    address_file = ray_temp_dir() / "ray_current_cluster"
    assert address_file.read_text() == two_nodes.address
    ckpt = make_checkpoint(tmp_path / "ckpt")
    out = tmp_path / "out"
    args = [
        "screen",
        "--sample",
        "--out",
        str(out),
        "--model",
        str(ckpt),
        "--address",
        two_nodes.address,
        "--batch-size",
        "4",
    ]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    m = json.loads((out / "manifest.json").read_text())
    assert m["cluster"]["mode"] == "joined" and m["cluster"]["nodes"] == 2
    assert m["inputs_seen"] == m["inputs_scored"] + m["inputs_skipped"] + m["inputs_failed"]
    assert m["inputs_lost"] == 0 and m["status"] == "complete"
    slices = pq.read_table(out / "slices").to_pandas()
    assert slices["slice_key"].is_unique and len(slices) == m["slices_total"] > 0
    # the live view and summary went to the console, without patient names
    assert "score slices" in result.output and "screening run" in result.output
    names = {
        str(pydicom.dcmread(p, stop_before_pixels=True).get("PatientName", ""))
        for p in (out / "_sample_archive").rglob("*.dcm")
        if p.parent.name != "broken"
    }
    names = {n for n in names if len(n) > 3}
    assert names and not [n for n in names if n in result.output]
    assert m["series_seen"] >= 6 and slices["study_key"].nunique() >= 5


def test_two_models_screen_a_mixed_archive_on_a_two_node_cluster(two_nodes, tmp_path: Path):
    from scope_support import CHEST_XR, EXPECTED, HEAD_CT, folder_of, make_mixed_archive

    archive = make_mixed_archive(tmp_path / "archive")
    head = make_scoped_checkpoint(tmp_path / "head", 0, HEAD_CT.to_dict(), threshold=1e9)
    chest = make_scoped_checkpoint(tmp_path / "chest", 1, CHEST_XR.to_dict(), threshold=-1e9)
    out = tmp_path / "out"
    args = ["screen", str(archive), "--out", str(out), "--model", str(head), "--model",
            str(chest), "--address", two_nodes.address, "--batch-size", "4"]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    m = json.loads((out / "manifest.json").read_text())
    ids = [json.loads((p / "config.json").read_text())["model_id"] for p in (head, chest)]
    assert [e["model_id"] for e in m["models"]] == ids
    assert [e["series_routed"] for e in m["models"]] == [2, 1]
    assert m["inputs_seen"] == m["inputs_scored"] + m["inputs_skipped"] + m["inputs_failed"]
    assert m["status"] == "complete" and m["inputs_lost"] == 0 and m["series_out_of_scope"] == 3
    slices = pq.read_table(out / "slices").to_pylist()
    from pdd_batch.ingest.keys import file_key

    folders = {  # rows name files by keyed digests
        file_key(p.relative_to(archive).as_posix()): folder_of([p.relative_to(archive).as_posix()])
        for p in archive.rglob("*")
        if p.is_file()
    }
    got = {folders[r["file_key"]]: r["model_id"] for r in slices}
    assert got == {f: ids[t] for f, (t, _) in EXPECTED.items() if t is not None}
    # each row flagged against its own model's threshold
    assert all(r["flagged"] == (r["model_id"] == ids[1]) for r in slices)
    errors = pq.read_table(out / "errors").to_pylist()
    scope_rows = [e for e in errors if e["reason"].startswith("outside every model's scope")]
    assert len(scope_rows) == m["inputs_out_of_scope"] > 0
    assert {e["status"] for e in scope_rows} == {"skipped"}
    reasons = {folders[e["file_key"]]: e["reason"] for e in scope_rows}
    assert reasons["mr_brain"] == "outside every model's scope (MR, BRAIN)"
    studies = pq.read_table(out / "studies").to_pylist()
    assert {s["model_id"] for s in studies} == set(ids)
