"""The DICOMweb client against a hostile or broken server: a tiny ``http.server`` on 127.0.0.1
in a test thread that sends huge multipart parts, ignores ``offset``, never ends its pages,
sends non-conformant UIDs, asks for a login, or is not TLS at all."""

from __future__ import annotations

import http.server
import io
import json
import logging
import threading
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import pydicom
import pytest
from dicom_factory import write_ct_series
from orthanc_server import free_port

from jobs.dicomweb_fetch import fetch_one
from pdd_batch.ingest.dicomweb import (
    DicomwebAuthError,
    DicomwebError,
    Endpoint,
    Query,
    SeriesHit,
    instance_file_name,
    probe,
    query_series,
)
from pdd_batch.ingest.dicomweb_retrieve import FetchLimits

MIB = 1024 * 1024
BOUNDARY = "pdd-hostile-boundary"
BAD_UID = "1.2.840.99999.NOT-A-UID.77"  # letters and a dash: pydicom's UI check complains


class Hostile:
    """A DICOMweb root at ``url`` whose answers come from ``routes``: path prefix -> handler
    ``(request) -> None`` (the handler writes the whole answer). Counts requests by prefix."""

    def __init__(self, routes: dict[str, Callable]) -> None:
        self.routes, self.requests = routes, {k: 0 for k in routes}
        self.sent = 0
        hostile = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:  # noqa: N802 - http.server's name
                for prefix, handler in hostile.routes.items():
                    if self.path.startswith("/dicom-web" + prefix):
                        hostile.requests[prefix] += 1
                        try:
                            handler(self)
                        except (BrokenPipeError, ConnectionResetError):
                            pass  # the client gave up: what it should do at a cap
                        return
                self.send_error(404)

            def log_message(self, *args: object) -> None:  # quiet
                return

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.server.hostile = self  # type: ignore[attr-defined]
        self.port = self.server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}/dicom-web"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> Hostile:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


def _json(request: http.server.BaseHTTPRequestHandler, items: list, code: int = 200) -> None:
    body = json.dumps(items).encode()
    request.send_response(code)
    request.send_header("Content-Type", "application/dicom+json")
    request.send_header("Content-Length", str(len(body)))
    request.end_headers()
    request.wfile.write(body)


def _series_item(n: int) -> dict:
    return {
        "0020000D": {"vr": "UI", "Value": [f"1.2.3.{n}"]},
        "0020000E": {"vr": "UI", "Value": [f"1.2.3.{n}.1"]},
        "00080060": {"vr": "CS", "Value": ["CT"]},
    }


def _offset(request: http.server.BaseHTTPRequestHandler) -> int:
    from urllib.parse import parse_qs, urlsplit

    return int(parse_qs(urlsplit(request.path).query).get("offset", ["0"])[0])


def _multipart(request: http.server.BaseHTTPRequestHandler, parts: Iterator[Iterator[bytes]]):
    """Send a chunked ``multipart/related`` answer, each part's bytes as they are made."""
    request.send_response(200)
    ctype = f'multipart/related; type="application/dicom"; boundary={BOUNDARY}'
    request.send_header("Content-Type", ctype)
    request.send_header("Transfer-Encoding", "chunked")
    request.end_headers()
    hostile = request.server.hostile  # type: ignore[attr-defined]

    def chunk(data: bytes) -> None:
        request.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
        hostile.sent += len(data)

    for part in parts:
        chunk(f"--{BOUNDARY}\r\nContent-Type: application/dicom\r\n\r\n".encode())
        for data in part:
            chunk(data)
        chunk(b"\r\n")
    chunk(f"--{BOUNDARY}--\r\n".encode())
    request.wfile.write(b"0\r\n\r\n")


@pytest.fixture
def serve() -> Iterator[Callable[[dict], Hostile]]:
    started: list[Hostile] = []

    def start(routes: dict) -> Hostile:
        server = Hostile(routes).__enter__()
        started.append(server)
        return server

    yield start
    for server in started:
        server.__exit__()


def _endpoint(url: str, **kw) -> Endpoint:
    return Endpoint(url, kw.get("user"), kw.get("password"), 5.0, kw.get("attempts", 1), 10)


HIT = SeriesHit("1.2.3.4", "1.2.3.4.5", "CT")


def _fetch(server: Hostile, tmp_path: Path, limits: FetchLimits):
    series_root, staging = tmp_path / "series", tmp_path / "staging"
    series_root.mkdir(parents=True)
    staging.mkdir()
    outcome = fetch_one(_endpoint(server.url), HIT, series_root, staging, limits)
    return outcome, series_root, staging


def test_a_huge_part_is_refused_at_the_cap_while_it_streams(serve, tmp_path) -> None:
    size = 256 * MIB

    def huge(request) -> None:
        part = (b"\0" * MIB for _ in range(size // MIB))
        _multipart(request, iter([part]))

    server = serve({"/studies/": huge})
    limits = FetchLimits(max_instance_bytes=4 * MIB, max_series_bytes=64 * MIB)
    outcome, series_root, staging = _fetch(server, tmp_path, limits)
    assert outcome.n_instances == 0
    assert outcome.error is not None and "--max-instance-bytes" in outcome.error
    assert server.sent < size // 4  # refused while it streamed: the rest was never read
    assert not any(series_root.iterdir()) and not any(staging.iterdir())


def _dicom_bytes(tmp_path: Path, sop_uid: str | None = None, n: int = 2) -> list[bytes]:
    files = write_ct_series(tmp_path / "src", n_slices=n, rows=16, cols=16, seed=3)
    out = []
    for f in files:
        ds = pydicom.dcmread(f)
        if sop_uid is not None:
            uid = f"{sop_uid}.{len(out)}"
            ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = uid
        buf = io.BytesIO()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds.save_as(buf, enforce_file_format=True)
        out.append(buf.getvalue())
    return out


def test_a_series_over_its_cap_is_refused(serve, tmp_path) -> None:
    parts = _dicom_bytes(tmp_path, n=4)

    def series(request) -> None:
        _multipart(request, (iter([p]) for p in parts))

    server = serve({"/studies/": series})
    cap = sum(len(p) for p in parts[:2]) + 1  # room for two instances, not four
    limits = FetchLimits(max_instance_bytes=cap, max_series_bytes=cap)
    outcome, series_root, _ = _fetch(server, tmp_path, limits)
    assert outcome.error is not None and "--max-series-bytes" in outcome.error
    assert not any(series_root.iterdir())
    whole, _, _ = _fetch(server, tmp_path / "again", FetchLimits())
    assert whole.error is None and whole.n_instances == 4


def test_a_non_conformant_uid_reaches_no_warning_log_or_console(
    serve, tmp_path, caplog, capfd, recwarn
) -> None:
    parts = _dicom_bytes(tmp_path, sop_uid=BAD_UID)

    def series(request) -> None:
        _multipart(request, (iter([p]) for p in parts))

    server = serve({"/studies/": series})
    caplog.set_level(logging.DEBUG)
    caplog.clear()  # what building the files said
    capfd.readouterr()
    recwarn.clear()
    outcome, series_root, _ = _fetch(server, tmp_path, FetchLimits())
    assert outcome.error is None and outcome.n_instances == 2
    files = sorted((series_root / HIT.key).iterdir())
    assert {f.name for f in files} == {instance_file_name(f"{BAD_UID}.{i}") for i in range(2)}
    assert {f.stat().st_mode & 0o777 for f in files} == {0o600}
    assert (series_root / HIT.key).stat().st_mode & 0o777 == 0o700
    text = caplog.text + "".join(capfd.readouterr())
    text += " ".join(str(w.message) for w in recwarn.list)
    assert BAD_UID not in text


def test_a_server_that_ignores_offset_ends_the_query(serve) -> None:
    server = serve({"/series": lambda r: _json(r, [_series_item(n) for n in range(2)])})
    found = query_series(_endpoint(server.url), Query(), page_size=2)
    assert len(found.hits) == 2
    assert server.requests["/series"] == 2  # the repeated page ended it


def test_an_endless_or_empty_answer_ends_the_query(serve) -> None:
    endless = serve({"/series": lambda r: _json(r, [_series_item(_offset(r) + n) for n in (0, 1)])})
    with pytest.raises(DicomwebError, match="more than 5 pages"):
        query_series(_endpoint(endless.url), Query(), page_size=2, max_pages=5)
    assert endless.requests["/series"] == 5
    empty = serve({"/series": lambda r: _json(r, [])})
    assert query_series(_endpoint(empty.url), Query(), page_size=2).hits == []
    assert empty.requests["/series"] == 1


def test_tls_to_a_plain_http_port_says_the_server_does_not_speak_tls(serve) -> None:
    server = serve({"/studies": lambda r: _json(r, [])})
    plain = server.url.replace("http://", "https://")
    with pytest.raises(DicomwebError) as err:
        probe(_endpoint(plain))
    message = str(err.value)
    assert "does not speak TLS" in message and f"127.0.0.1:{server.port}" in message
    assert "REQUESTS_CA_BUNDLE" not in message


def test_connection_errors_name_host_and_port_and_their_cause() -> None:
    port = free_port()  # nothing listens there
    with pytest.raises(DicomwebError) as refused:
        query_series(_endpoint(f"http://127.0.0.1:{port}/dicom-web", attempts=4), Query())
    assert f"connection refused by 127.0.0.1:{port}" in str(refused.value)
    with pytest.raises(DicomwebError) as unknown:
        query_series(_endpoint("http://no-such-pacs.invalid:8042/dicom-web"), Query())
    assert "unknown host no-such-pacs.invalid" in str(unknown.value)
    assert str(unknown.value) != str(refused.value)


def test_a_login_wanted_and_none_given_is_not_called_refused(serve) -> None:
    server = serve({"/studies": lambda r: _json(r, [], code=401)})
    with pytest.raises(DicomwebAuthError) as none_given:
        probe(_endpoint(server.url))
    assert "none was given" in str(none_given.value)
    assert "refused" not in str(none_given.value)
    with pytest.raises(DicomwebAuthError) as refused:
        probe(_endpoint(server.url, user="u", password="secret-pw"))
    assert "refused the credentials (HTTP 401)" in str(refused.value)
    assert "secret-pw" not in str(refused.value)


def test_a_part_that_is_not_a_dicom_file_is_refused_without_parsing_it(serve, tmp_path) -> None:
    def junk(request) -> None:
        _multipart(request, iter([iter([b"\0" * MIB])]))  # no preamble, no DICM

    outcome, series_root, staging = _fetch(serve({"/studies/": junk}), tmp_path, FetchLimits())
    assert outcome.error == "a retrieved instance is not a DICOM file (no DICM header)"
    assert not any(series_root.iterdir()) and not any(staging.iterdir())
