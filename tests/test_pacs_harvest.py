"""``--since last-run`` without a live dcm4chee-arc: the StudyReceiveDateTime query built from
the run folder's record, the server-kind probe against a small server on 127.0.0.1 that
answers the probe as dcm4chee-arc does, and paging that a server's own result cap cannot cut
short (a QIDO-RS server capping every answer below the page size)."""

from __future__ import annotations

import http.server
import json
import threading
from collections.abc import Callable, Iterator
from datetime import date, datetime, timedelta, timezone
from urllib.parse import parse_qs, urlsplit

import pytest

from pdd_batch.ingest import pacs_harvest as ph
from pdd_batch.ingest.dicomweb import DicomwebError, Endpoint, Query, query_series, record_query

DEVICE_NAME = {"dicomDeviceName": "dcm4chee-arc", "UIConfigurationDeviceName": "dcm4chee-arc"}


class Server:
    """An HTTP server on 127.0.0.1 (free port) answering GETs from ``routes`` (exact path ->
    handler ``(query dict) -> (status, JSON body)``); records every request's method, path and
    query, and answers 404 elsewhere."""

    def __init__(self, routes: dict[str, Callable[[dict], tuple[int, object]]]) -> None:
        self.routes, self.requests = routes, []
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def _answer(self) -> None:
                parts = urlsplit(self.path)
                query = {k: v[0] for k, v in parse_qs(parts.query).items()}
                server.requests.append((self.command, parts.path, query))
                route = server.routes.get(parts.path) if self.command == "GET" else None
                status, body = route(query) if route else (404, {"error": "not found"})
                data = body.encode() if isinstance(body, str) else json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = do_PUT = do_DELETE = _answer  # noqa: N815 - http.server names

            def log_message(self, *args: object) -> None:  # quiet
                return

        self.http = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.http.daemon_threads = True
        self.base = f"http://127.0.0.1:{self.http.server_address[1]}"
        self.thread = threading.Thread(target=self.http.serve_forever, daemon=True)

    def endpoint(self, root: str) -> Endpoint:
        return Endpoint(self.base + root, "user", "pw", timeout_s=5.0, backoff_ms=1)

    def paths(self) -> list[str]:
        return [p for _, p, _ in self.requests]


@pytest.fixture
def serve() -> Iterator[Callable[[dict], Server]]:
    started: list[Server] = []

    def start(routes: dict) -> Server:
        server = Server(routes)
        server.thread.start()
        started.append(server)
        return server

    yield start
    for server in started:
        server.http.shutdown()
        server.http.server_close()


DCM4CHEE_ROOT = "/dcm4chee-arc/aets/DCM4CHEE/rs"


def test_the_dcm4chee_receive_query_is_built_from_the_recorded_cursor(tmp_path) -> None:
    started = datetime(2026, 12, 7, 2, 30, tzinfo=timezone(timedelta(hours=1)))  # 01:30 UTC
    uids = ("1.2.826.0.1.3680043.8.498.1", "1.2.826.0.1.3680043.8.498.2")
    assert ph.cursor_kind(ph.DCM4CHEE, tmp_path) == ph.CURSOR_WINDOW  # nothing recorded yet
    record_query(tmp_path, started, Query(since=date(2026, 12, 1), study_uids=uids), 3)
    assert not any(u in (tmp_path / "_pacs" / "query.json").read_text() for u in uids)
    cursor = ph.last_query_time(tmp_path)
    assert ph.cursor_kind(ph.DCM4CHEE, tmp_path) == ph.CURSOR_DCM4CHEE
    # the previous query's UTC time minus the 24 h overlap, an open DT range
    assert ph.receive_time_filter(cursor) == {"StudyReceiveDateTime": "20261206013000-"}
    assert ph.receive_time_filter(cursor, timedelta(hours=2)) == {
        "StudyReceiveDateTime": "20261206233000-"
    }
    assert ph.lookback_days(ph.CURSOR_DCM4CHEE, None) == 1
    assert ph.cursor_kind(ph.GENERIC, tmp_path) == ph.CURSOR_WINDOW
    assert ph.cursor_kind(ph.ORTHANC, tmp_path) == ph.CURSOR_WINDOW  # no change-log position
    assert ph.lookback_days(ph.CURSOR_WINDOW, None) == ph.DEFAULT_LOOKBACK_DAYS == 7
    assert ph.lookback_days(ph.CURSOR_WINDOW, 30) == 30


def test_auto_probes_dcm4chee_by_its_device_name_with_one_read_only_request(serve) -> None:
    server = serve({"/dcm4chee-arc/devicename": lambda q: (200, DEVICE_NAME)})
    assert ph.resolve_kind(server.endpoint(DCM4CHEE_ROOT), ph.AUTO) == (ph.DCM4CHEE, "probe")
    assert server.requests == [("GET", "/dcm4chee-arc/devicename", {})]
    server.requests.clear()
    # another root shape: Orthanc's /system answers 404 there, dcm4chee-arc is not asked
    assert ph.resolve_kind(server.endpoint("/dicom-web"), ph.AUTO) == (ph.GENERIC, "probe")
    assert server.paths() == ["/system"]
    server.requests.clear()
    assert ph.resolve_kind(server.endpoint("/pacs/rs"), ph.AUTO) == (ph.GENERIC, "probe")
    assert ph.resolve_kind(server.endpoint("/pacs/rs"), ph.DCM4CHEE) == (ph.DCM4CHEE, "option")
    assert server.requests == []  # nothing probed: no known shape, or the kind was given
    with pytest.raises(DicomwebError, match="no Orthanc REST API"):
        ph.resolve_kind(server.endpoint(DCM4CHEE_ROOT), ph.ORTHANC)
    with pytest.raises(DicomwebError, match="--pacs-kind wants one of"):
        ph.resolve_kind(server.endpoint(DCM4CHEE_ROOT), "dcm4che")


@pytest.mark.parametrize(
    "answer",
    [(404, {"error": "not found"}), (200, "<html>login</html>"), (200, {"name": "x"}), (500, {})],
)
def test_a_server_that_does_not_answer_the_probe_as_dcm4chee_is_generic(serve, answer) -> None:
    server = serve({"/dcm4chee-arc/devicename": lambda q: answer})
    assert ph.resolve_kind(server.endpoint(DCM4CHEE_ROOT), ph.AUTO) == (ph.GENERIC, "probe")
    assert server.paths() == ["/dcm4chee-arc/devicename"]  # once: a probe is not retried


def _capped(items: list[dict], cap: int) -> Callable[[dict], tuple[int, object]]:
    """A QIDO-RS search that honours ``offset`` but never answers more than ``cap`` items,
    whatever ``limit`` asks (a server's own result cap)."""

    def answer(query: dict) -> tuple[int, object]:
        offset, limit = int(query.get("offset", 0)), int(query.get("limit", 1000))
        return 200, items[offset : offset + min(limit, cap)]

    return answer


def _study(n: int) -> dict:
    return {"0020000D": {"vr": "UI", "Value": [f"1.2.826.0.1.3680043.8.498.{n}"]}}


def test_the_receive_time_search_pages_past_a_server_result_cap(serve) -> None:
    studies = [_study(n) for n in range(7)]
    server = serve({DCM4CHEE_ROOT + "/studies": _capped(studies, cap=3)})
    cursor = datetime(2026, 12, 7, 1, 30, tzinfo=timezone.utc)
    found = ph.studies_received_dcm4chee(server.endpoint(DCM4CHEE_ROOT), cursor)
    assert found == tuple(s["0020000D"]["Value"][0] for s in studies)
    sent = [q for _, _, q in server.requests]
    assert [int(q["offset"]) for q in sent] == [0, 3, 6, 7]  # until an empty page
    assert {q["StudyReceiveDateTime"] for q in sent} == {"20261206013000-"}


def test_a_series_search_pages_past_a_server_result_cap(serve) -> None:
    series = [
        {**_study(n), "0020000E": {"vr": "UI", "Value": [f"1.2.826.0.1.3680043.8.498.{n}.1"]}}
        for n in range(5)
    ]
    server = serve({"/dicom-web/series": _capped(series, cap=2)})
    found = query_series(server.endpoint("/dicom-web"), Query(), page_size=100)
    assert len(found.hits) == 5  # a short page (the cap) did not end the query


def test_studies_found_by_a_cursor_and_by_the_window_are_queried_once(serve) -> None:
    """``with_studies``: a study of the cursor that the window found is not asked again; a new
    one is asked for its series once; a --study-uid-file list still applies."""
    a, b, c = (f"1.2.826.0.1.3680043.8.498.{n}" for n in (1, 2, 3))

    def series_of(uid: str) -> dict:
        return {"0020000D": {"vr": "UI", "Value": [uid]},
                "0020000E": {"vr": "UI", "Value": [uid + ".1"]}}  # fmt: skip

    routes = {f"/dicom-web/studies/{u}/series": _capped([series_of(u)], 100) for u in (a, b, c)}
    server = serve({**routes, "/dicom-web/series": _capped([series_of(a)], 100)})
    endpoint = server.endpoint("/dicom-web")
    window = query_series(endpoint, Query())
    server.requests.clear()
    merged, named, both = ph.with_studies(endpoint, Query(), window, (a, b, a))
    assert (named, both) == (2, 1) and {h.study_uid for h in merged.hits} == {a, b}
    assert sorted(set(server.paths())) == [f"/dicom-web/studies/{b}/series"]
    listed, named, both = ph.with_studies(endpoint, Query(study_uids=(a,)), window, (b, c))
    assert (named, both) == (0, 0) and listed.hits == window.hits


def test_a_dcm4chee_last_run_adds_the_received_studies_to_the_window(serve, tmp_path) -> None:
    """The wiring of ``add_received`` for dcm4chee: the receive-time search from the recorded
    query time, the new study's series asked once, the study of both parts not asked again,
    the counts in ``harvest``."""
    a, b = (f"1.2.826.0.1.3680043.8.498.{n}" for n in (1, 2))

    def series_of(uid: str) -> dict:
        return {"0020000D": {"vr": "UI", "Value": [uid]},
                "0020000E": {"vr": "UI", "Value": [uid + ".1"]}}  # fmt: skip

    root = DCM4CHEE_ROOT
    server = serve(
        {
            root + "/series": _capped([series_of(a)], 100),  # the StudyDate window
            root + "/studies": _capped([_study(1), _study(2)], 100),  # received since
            root + f"/studies/{a}/series": _capped([series_of(a)], 100),
            root + f"/studies/{b}/series": _capped([series_of(b)], 100),
        }
    )
    started = datetime(2026, 12, 7, 1, 30, tzinfo=timezone.utc)
    record_query(tmp_path, started, Query(since=date(2026, 12, 5)), 1)
    endpoint = server.endpoint(root)
    query = Query(since=date(2026, 12, 6))
    window = query_series(endpoint, query)
    plan = ph.Harvest(ph.DCM4CHEE, "probe", ph.cursor_kind(ph.DCM4CHEE, tmp_path), 1)
    server.requests.clear()
    got = ph.add_received(endpoint, query, window, tmp_path, plan, None)
    assert {h.study_uid for h in got.hits} == {a, b}
    assert (got.harvest.studies_window, got.harvest.studies_cursor) == (1, 2)
    assert got.harvest.studies_both == 1 and got.harvest.cursor == ph.CURSOR_DCM4CHEE
    asked = {p: q for _, p, q in server.requests}
    assert asked[root + "/studies"]["StudyReceiveDateTime"] == "20261206013000-"
    assert root + f"/studies/{a}/series" not in asked  # found by the window: not asked again
    assert root + f"/studies/{b}/series" in asked


def test_an_orthanc_change_log_that_never_ends_is_an_error_not_a_short_list(
    serve, monkeypatch
) -> None:
    from pdd_batch.ingest import orthanc_changes

    def endless(query: dict) -> tuple[int, object]:
        since = int(query.get("since", 0))
        change = {"ChangeType": "StableStudy", "Seq": since + 1, "ID": f"id{since}"}
        return 200, {"Changes": [change], "Last": since + 1, "Done": False}

    server = serve({"/changes": endless})
    monkeypatch.setattr(orthanc_changes, "MAX_CHANGE_PAGES", 3)
    with pytest.raises(DicomwebError, match="more than 3 pages"):
        orthanc_changes.studies_received(server.endpoint("/dicom-web"), 0, 10**9)
    assert server.paths() == ["/changes"] * 3
