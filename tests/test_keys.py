"""The site key and keyed identifiers (issue 16 item 3): keys are HMAC-SHA256 under a per-site
secret kept in a private file, so the PACS alone cannot link a key back to a study; file keys
replace paths; reasons are redacted of paths; the screening crosswalk is private."""

from __future__ import annotations

import hashlib
import json
import os
import stat
from pathlib import Path

import pytest

from pdd_batch.ingest import keys
from pdd_batch.ingest.discovery import discover
from pdd_batch.runs.crosswalk import CrosswalkError, check_location, read_crosswalk, write_crosswalk

UID = "1.2.826.0.1.3680043.8.498.12345678901234567890"


@pytest.fixture
def key_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh key file location of this test's own."""
    path = tmp_path / "config" / "pdd-batch" / "site.key"
    monkeypatch.setenv(keys.KEY_FILE_ENV, str(path))
    keys.clear_cache()
    yield path
    keys.clear_cache()


def test_site_key_is_created_private_once_and_reused(key_file: Path) -> None:
    first = keys.study_key(UID)
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert stat.S_IMODE(key_file.parent.stat().st_mode) == 0o700
    secret = bytes.fromhex(key_file.read_text().strip())
    assert len(secret) == keys.SECRET_BYTES
    keys.clear_cache()
    assert keys.study_key(UID) == first  # read back, not created again
    assert keys.site_key().key_id == hashlib.sha256(secret).hexdigest()[:12]
    assert secret.hex() not in repr(keys.site_key())


def test_keys_are_keyed_not_plain_digests_of_uids(key_file: Path, tmp_path: Path) -> None:
    """Someone holding the UIDs (the PACS) cannot recompute a key without the secret: it is not
    the 1.0 unsalted SHA-256, and another site's secret gives other keys."""
    key = keys.study_key(UID)
    plain = hashlib.sha256("\x1f".join(("study", UID)).encode()).hexdigest()[:16]
    assert key != plain and key not in hashlib.sha256(UID.encode()).hexdigest()
    other = keys.load_site_key(tmp_path / "other" / "site.key")
    assert other.digest("study", "study", UID) != key
    assert other.key_id != keys.site_key().key_id
    assert keys.file_key("DOE^JOHN_12345/IM1.dcm") != keys.file_key("DOE^JOHN_12345/IM2.dcm")
    assert keys.series_key(UID, UID + ".1") != keys.series_key(UID, UID + ".1", part=1)


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o644])
def test_key_file_readable_by_others_is_refused(key_file: Path, mode: int) -> None:
    keys.site_key()
    keys.clear_cache()
    key_file.chmod(mode)
    with pytest.raises(keys.SiteKeyError, match="read by others"):
        keys.study_key(UID)


def test_key_file_that_is_a_link_is_refused(key_file: Path, tmp_path: Path) -> None:
    real = tmp_path / "elsewhere.key"
    keys.load_site_key(real)  # a private, valid key file...
    key_file.parent.mkdir(parents=True)
    key_file.symlink_to(real)  # ...reached through a link
    with pytest.raises(keys.SiteKeyError, match="symbolic link"):
        keys.site_key()


def test_worker_gets_only_the_series_subkey(key_file: Path) -> None:
    full = keys.site_key()
    scoped = keys.SiteKey.import_scoped(full.export_scoped("series"))
    assert scoped.digest("series", "a", "b") == full.digest("series", "a", "b")
    with pytest.raises(keys.SiteKeyError, match="no 'study' key"):
        scoped.digest("study", "study", UID)
    assert full.export_scoped("series").split(":")[-1] not in key_file.read_text()


def test_redact_paths_removes_paths_and_their_parts() -> None:
    rel = "DOE^JOHN_12345/CT head/IM-0001-0042.dcm"
    text = (
        f"SeriesReadError: {rel}: truncated; IM-0001-0042.dcm again; folder DOE^JOHN_12345; "
        "zip DOE^JOHN_12345/batch.zip!inner/x.dcm"
    )
    out = keys.redact_paths(text, [rel, "DOE^JOHN_12345/batch.zip!inner/x.dcm"])
    for part in ("DOE^JOHN", "12345", "IM-0001", "CT head", "batch.zip", "inner/x.dcm"):
        assert part not in out, out
    assert out.startswith("SeriesReadError: <file>: truncated")


def test_crosswalk_is_private_refuses_links_and_the_run_folder(
    key_file: Path, tmp_path: Path
) -> None:
    from dicom_factory import write_ct_series

    paths = write_ct_series(tmp_path / "arch" / "DOE^JOHN_12345", n_slices=2, rows=8, cols=8)
    disc = discover(tmp_path / "arch")
    cw = write_crosswalk(tmp_path / "private" / "cw.json", disc, keys.site_key().key_id)
    assert stat.S_IMODE(cw.stat().st_mode) == 0o600
    doc = read_crosswalk(cw)
    entry = {f["path"]: f for f in doc["files"]}["DOE^JOHN_12345/" + paths[0].name]
    assert entry["file_key"] == keys.file_key("DOE^JOHN_12345/" + paths[0].name)
    assert entry["StudyInstanceUID"] and entry["SOPInstanceUID"] and entry["series_key"]
    assert doc["key_id"] == keys.site_key().key_id and "secret" not in json.dumps(doc)
    # an existing world-readable file is made private on rewrite
    cw.chmod(0o644)
    write_crosswalk(cw, disc, keys.site_key().key_id)
    assert stat.S_IMODE(cw.stat().st_mode) == 0o600
    # a planted link is not followed
    target = tmp_path / "victim.txt"
    target.write_text("keep")
    link = tmp_path / "link.json"
    link.symlink_to(target)
    with pytest.raises(CrosswalkError, match="symbolic link"):
        write_crosswalk(link, disc, "k")
    assert target.read_text() == "keep"
    with pytest.raises(CrosswalkError, match="outside the run folder"):
        check_location(tmp_path / "out" / "cw.json", tmp_path / "out")
    check_location(tmp_path / "cw.json", tmp_path / "out")
    assert os.environ[keys.KEY_FILE_ENV] == str(key_file)


def test_screen_refuses_unsafe_key_or_crosswalk_before_any_work(
    key_file: Path, tmp_path: Path
) -> None:
    from typer.testing import CliRunner

    from pdd_batch.cli.app import app

    (tmp_path / "arch").mkdir()
    out = tmp_path / "out"
    runner = CliRunner(env={"COLUMNS": "200"})
    inside = ["screen", str(tmp_path / "arch"), "--out", str(out), "--crosswalk", str(out / "c")]
    result = runner.invoke(app, inside)
    assert result.exit_code == 2 and "outside the run folder" in result.output
    keys.site_key()
    keys.clear_cache()
    key_file.chmod(0o644)
    result = runner.invoke(app, ["screen", str(tmp_path / "arch"), "--out", str(out)])
    assert result.exit_code == 2 and "chmod 600" in result.output
    assert not out.exists()  # nothing written before the checks
