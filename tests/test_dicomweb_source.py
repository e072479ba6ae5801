"""The DICOMweb source without a server: URLs, credentials (env, netrc), ``--since``, the query
record of ``--since last-run`` and the run's UID file."""

from __future__ import annotations

import json
from datetime import date, datetime, timezone

import pytest

from pdd_batch.ingest.dicomweb import (
    PASSWORD_ENV,
    USER_ENV,
    DicomwebError,
    Query,
    endpoint_from_source,
    is_dicomweb_source,
    last_query_time,
    parse_since,
    read_study_uid_file,
    record_query,
)


@pytest.fixture
def no_env(monkeypatch, tmp_path):
    monkeypatch.delenv(USER_ENV, raising=False)
    monkeypatch.delenv(PASSWORD_ENV, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))


def test_sources_are_recognised_and_split_into_an_http_root(no_env) -> None:
    assert is_dicomweb_source("dicomweb+https://pacs.example.org/dicom-web")
    assert is_dicomweb_source("DICOMweb+http://127.0.0.1:8042/dicom-web/")
    assert not is_dicomweb_source("/archive/dicomweb+http")
    assert not is_dicomweb_source("http://pacs/dicom-web")
    ep = endpoint_from_source("dicomweb+http://127.0.0.1:8042/dicom-web/")
    assert ep.url == "http://127.0.0.1:8042/dicom-web" and ep.user is None
    assert ep.host == "127.0.0.1:8042"


def test_credentials_come_from_the_environment_before_netrc_and_never_show(
    no_env, monkeypatch, tmp_path
) -> None:
    netrc = tmp_path / "netrc"
    netrc.write_text("machine pacs.example.org login nightly password from-netrc\n")
    netrc.chmod(0o600)
    ep = endpoint_from_source("dicomweb+https://pacs.example.org/rs", netrc)
    assert (ep.user, ep.password) == ("nightly", "from-netrc")
    assert "from-netrc" not in repr(ep)
    monkeypatch.setenv(USER_ENV, "envuser")
    monkeypatch.setenv(PASSWORD_ENV, "from-env")
    ep = endpoint_from_source("dicomweb+https://pacs.example.org/rs", netrc)
    assert (ep.user, ep.password) == ("envuser", "from-env")
    other = endpoint_from_source("dicomweb+https://other.example.org/rs", netrc)
    assert other.user == "envuser"  # the environment applies to any host


def test_credentials_in_the_url_or_a_missing_netrc_are_refused(no_env, tmp_path) -> None:
    with pytest.raises(DicomwebError, match="not in the URL") as exc:
        endpoint_from_source("dicomweb+https://user:secret@pacs.example.org/rs")
    assert "secret" not in str(exc.value)
    with pytest.raises(DicomwebError, match="netrc file not found"):
        endpoint_from_source("dicomweb+https://pacs.example.org/rs", tmp_path / "nope")


def test_since_takes_a_date_or_last_run(tmp_path) -> None:
    assert parse_since("2026-12-01", tmp_path) == (date(2026, 12, 1), False)
    assert parse_since("20261201", tmp_path) == (date(2026, 12, 1), False)
    assert parse_since("last-run", tmp_path) == (None, True)  # a first run: everything
    with pytest.raises(DicomwebError, match="--since"):
        parse_since("yesterday", tmp_path)
    assert Query(since=date(2026, 12, 1), modality="CT").series_filters() == {
        "StudyDate": "20261201-",
        "Modality": "CT",
    }


def test_the_query_record_gives_last_run_and_the_widest_window(tmp_path) -> None:
    first = datetime(2026, 12, 3, 1, 30, tzinfo=timezone.utc)
    record_query(tmp_path, first, Query(since=date(2026, 11, 1), modality="CT"), 7)
    assert last_query_time(tmp_path) == first
    assert parse_since("last-run", tmp_path) == (date(2026, 12, 2), True)
    second = datetime(2026, 12, 4, 1, 30, tzinfo=timezone.utc)
    record_query(tmp_path, second, Query(since=date(2026, 12, 2), modality="CT"), 1)
    record = json.loads((tmp_path / "_pacs" / "query.json").read_text())
    assert record["earliest_since"] == "2026-11-01" and record["series_found"] == 1
    assert parse_since("last-run", tmp_path) == (date(2026, 12, 3), True)
    assert (tmp_path / "_pacs").stat().st_mode & 0o777 == 0o700


def test_the_study_uid_file_is_checked_line_by_line(tmp_path) -> None:
    good = tmp_path / "uids.txt"
    good.write_text("# tonight\n1.2.840.113619.2.1\n\n1.3.6.1.4.1.9590.100.1  # a comment\n")
    assert read_study_uid_file(good) == ("1.2.840.113619.2.1", "1.3.6.1.4.1.9590.100.1")
    bad = tmp_path / "bad.txt"
    bad.write_text("1.2.3\nDOE^JOHN\n")
    with pytest.raises(DicomwebError, match="line 2: not a UID") as exc:
        read_study_uid_file(bad)
    assert "DOE" not in str(exc.value)


def test_a_login_over_plain_http_goes_only_to_this_machine_unless_allowed(
    no_env, monkeypatch
) -> None:
    monkeypatch.setenv(USER_ENV, "nightly")
    monkeypatch.setenv(PASSWORD_ENV, "clear-text-pw")
    with pytest.raises(DicomwebError, match="clear text over http://") as exc:
        endpoint_from_source("dicomweb+http://pacs.example.org:8042/dicom-web")
    assert "pacs.example.org:8042" in str(exc.value) and "clear-text-pw" not in str(exc.value)
    allowed = endpoint_from_source("dicomweb+http://pacs.example.org/rs", allow_insecure_http=True)
    assert allowed.user == "nightly"
    for local in ("127.0.0.1:8042", "localhost", "[::1]:8042", "127.0.0.2"):
        assert endpoint_from_source(f"dicomweb+http://{local}/rs").user == "nightly"
    assert endpoint_from_source("dicomweb+https://pacs.example.org/rs").user == "nightly"
    monkeypatch.delenv(USER_ENV)
    monkeypatch.delenv(PASSWORD_ENV)
    assert endpoint_from_source("dicomweb+http://pacs.example.org/rs").user is None  # no login


def test_a_netrc_readable_by_others_is_refused(no_env, tmp_path) -> None:
    netrc = tmp_path / "netrc"
    netrc.write_text("machine pacs.example.org login nightly password from-netrc\n")
    for mode in (0o644, 0o640, 0o604):
        netrc.chmod(mode)
        with pytest.raises(DicomwebError, match="readable by other users") as exc:
            endpoint_from_source("dicomweb+https://pacs.example.org/rs", netrc)
        assert "from-netrc" not in str(exc.value)
    netrc.chmod(0o600)
    assert endpoint_from_source("dicomweb+https://pacs.example.org/rs", netrc).user == "nightly"


def test_doctor_takes_a_netrc_and_says_where_the_login_came_from(no_env, tmp_path) -> None:
    from typer.testing import CliRunner

    from pdd_batch.cli.app import app

    netrc = tmp_path / "netrc"
    netrc.write_text("machine 127.0.0.1 login nightly password from-netrc\n")
    netrc.chmod(0o644)
    url = "dicomweb+http://127.0.0.1:9/dicom-web"  # port 9: nothing answers
    args = ["doctor", "--json", "--dicomweb", url, "--netrc", str(netrc)]
    loose = CliRunner().invoke(app, args)
    assert loose.exit_code == 1 and "readable by other users" in loose.output
    netrc.chmod(0o600)
    report = json.loads(CliRunner().invoke(app, args).output)["dicomweb"]
    assert report["login"] == "from netrc file netrc" and report["answers"] is False
    assert "connection refused by 127.0.0.1:9" in report["note"]
    assert "from-netrc" not in json.dumps(report)


def test_screen_of_a_bare_http_url_gives_the_syntax_before_making_any_folder(tmp_path) -> None:
    from typer.testing import CliRunner

    from pdd_batch.cli.app import app

    out = tmp_path / "run"
    result = CliRunner().invoke(
        app, ["screen", "http://pacs.example.org/dicom-web", "-o", str(out)]
    )
    assert result.exit_code == 2
    assert "dicomweb+http://" in result.output
    assert not out.exists() and not (tmp_path / "http:").exists()
    assert list(tmp_path.iterdir()) == []


def test_pacs_kind_and_lookback_days_are_refused_where_they_mean_nothing(tmp_path) -> None:
    from typer.testing import CliRunner

    from pdd_batch.cli.app import app

    folder, out = tmp_path / "archive", tmp_path / "run"
    folder.mkdir()
    on_folder = CliRunner().invoke(
        app, ["screen", str(folder), "--pacs-kind", "generic", "-o", str(out)]
    )
    assert on_folder.exit_code == 2 and "dicomweb+ sources" in on_folder.output
    url = "dicomweb+http://127.0.0.1:9/dicom-web"  # never asked: refused before
    dated = CliRunner().invoke(
        app, ["screen", url, "--since", "2026-12-01", "--lookback-days", "3", "-o", str(out)]
    )
    assert dated.exit_code == 2 and "applies to --since last-run" in dated.output
    assert not out.exists()
