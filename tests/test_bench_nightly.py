"""Smoke test of `pdd-batch bench nightly` at a tiny size (the figures themselves are measured by
running the command, docs/benchmarks.md): it builds the stores, times the nights, discovers an
archive twice and prints the ratio last."""

from __future__ import annotations

import re

from typer.testing import CliRunner

from pdd_batch.cli.app import app


def test_bench_nightly_prints_each_figure_and_the_ratio_last(tmp_path) -> None:
    args = ["bench", "nightly", "--sizes", "20,200", "--discovery-files", "120", "--rounds", "1",
            "--workdir", str(tmp_path)]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    lines = result.output.strip().splitlines()
    assert re.fullmatch(r"nightly cost ratio 200/20: \d+\.\d\d", lines[-1])
    assert sum("one series commit" in line for line in lines) == 2
    found = [line for line in lines if line.startswith("discovery of 120 files")]
    assert found and "(120 header reads)" in found[0] and "(0 header reads)" in found[0]
    assert not list(tmp_path.iterdir())  # the synthetic stores are removed
