"""`pdd-batch screen --sample --address`: the bundled sample archive screened through the CLI on
a two-node Ray cluster (both nodes on this machine)."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pydicom
import pytest
from ray.cluster_utils import Cluster
from ray_support import ray_node_args
from screen_support import make_checkpoint
from typer.testing import CliRunner

from pdd_batch.cli.app import app

pytestmark = [pytest.mark.ray, pytest.mark.slow]


@pytest.fixture
def two_nodes():
    cluster = Cluster(initialize_head=True, head_node_args=ray_node_args(num_cpus=1))
    cluster.add_node(**ray_node_args(num_cpus=1))
    cluster.wait_for_nodes()
    yield cluster
    cluster.shutdown()


def test_cli_screens_the_sample_on_a_two_node_cluster(two_nodes, tmp_path: Path) -> None:
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
