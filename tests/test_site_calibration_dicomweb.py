"""`calibrate --archive` and `train --archive` from a PACS over DICOMweb with --study-uid-file,
against the live Orthanc of tests/orthanc_server.py: only the listed studies take part, and no
UID is printed or stored."""

from __future__ import annotations

import json
import tempfile

import pytest
from screen_support import make_checkpoint
from site_support import write_site_archive
from typer.testing import CliRunner

from pdd_batch.cli.app import app
from pdd_batch.ingest.dicomweb import PASSWORD_ENV, USER_ENV
from pdd_batch.ingest.discovery import discover

pytestmark = [pytest.mark.ray, pytest.mark.slow]
runner = CliRunner()
N_LISTED = 6


@pytest.fixture(scope="module")
def ray_local(shared_ray):
    """The session's shared local Ray (conftest ``shared_ray``; token auth, loopback only,
    private temp folder): the commands of the tests join it, no start per command."""
    from ray_support import use_shared_ray

    use_shared_ray()


@pytest.fixture(scope="module")
def pacs(orthanc, tmp_path_factory) -> dict:  # noqa: F811
    """Seven normal studies in the PACS; the UID file lists six (with a comment and a blank)."""
    base = tmp_path_factory.mktemp("site-pacs")
    uids = write_site_archive(base / "listed", N_LISTED)
    other = write_site_archive(base / "unlisted", 1, first=N_LISTED)
    orthanc.clear()
    orthanc.upload(sorted((base / "listed").rglob("*.dcm")))
    orthanc.upload(sorted((base / "unlisted").rglob("*.dcm")))
    uid_file = base / "normals.txt"
    uid_file.write_text("# the site's normal studies\n\n" + "\n".join(uids) + "\n")
    return {"base": base, "uids": uids + other, "uid_file": uid_file}


def _env(monkeypatch, orthanc) -> None:  # noqa: F811
    monkeypatch.setenv(USER_ENV, orthanc.user)
    monkeypatch.setenv(PASSWORD_ENV, orthanc.password)
    monkeypatch.setenv("HOME", "/nonexistent")  # no ~/.netrc of the machine


def _no_uid(text: str, uids: list[str]) -> None:
    leaked = [u for u in uids if u in text]
    assert not leaked, f"{len(leaked)} StudyInstanceUIDs printed or stored"


def test_calibrate_from_dicomweb_uses_the_listed_studies_only(
    ray_local, pacs, orthanc, monkeypatch, tmp_path  # noqa: F811
) -> None:  # fmt: skip
    _env(monkeypatch, orthanc)
    ckpt = make_checkpoint(tmp_path / "ckpt")
    args = ["calibrate", orthanc.dicomweb_url, "--archive", "--model", str(ckpt)]
    r = runner.invoke(app, [*args, "--holdout", "0.34", "--bootstrap", "200"])
    assert r.exit_code == 2 and "--study-uid-file" in r.output  # a PACS needs the list
    r = runner.invoke(
        app, [*args, "--holdout", "0.34", "--bootstrap", "200", "--study-uid-file",
              str(pacs["uid_file"])],
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    config_text = (ckpt / "config.json").read_text()
    rec = json.loads(config_text)["calibration"]
    listed = discover(pacs["base"] / "listed")
    n_slices = sum(ref.n_slices for ref in listed.series)
    assert rec["source"] == "site" and rec["site"]["n_studies"] == N_LISTED
    assert rec["site"]["n_slices"] == n_slices  # the unlisted study was not fetched
    held = rec["site"]["heldout"]
    assert held["n_studies"] == 2 and 0.0 <= held["study_fpr"] <= 1.0
    assert set(rec["site"]["heldout_study_keys"]) < {ref.study_key for ref in listed.series}
    assert f"{N_LISTED} listed studies" in rec["data"]
    _no_uid(r.output + config_text, pacs["uids"])


def test_train_from_dicomweb_fetches_the_listed_studies(
    ray_local, pacs, orthanc, monkeypatch, tmp_path  # noqa: F811
) -> None:  # fmt: skip
    _env(monkeypatch, orthanc)
    private_tmp = tmp_path / "tmp"  # this test's own temp folder: no other run's leftovers
    private_tmp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(private_tmp))
    out = tmp_path / "ck"
    r = runner.invoke(
        app, ["train", orthanc.dicomweb_url, "--archive", "--study-uid-file",
              str(pacs["uid_file"]), "--config", "test", "--epochs", "1", "--batch-size", "4",
              "--out", str(out)],
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    meta = json.loads((out / "config.json").read_text())
    listed = discover(pacs["base"] / "listed")
    assert meta["training"]["n_images"] == sum(ref.n_slices for ref in listed.series)
    assert meta["scope"]["modalities"] == ["CT"]  # derived from the fetched headers
    _no_uid(r.output + json.dumps(meta), pacs["uids"])
    assert not list(private_tmp.glob("pdd-pacs-*"))  # the fetched studies were deleted
