"""A real Orthanc PACS with its DICOMweb plugin for the tests (Debian's ``orthanc`` and
``orthanc-dicomweb`` packages; ``.ci/setup`` installs them where it runs as root).

``orthanc_process`` starts one on 127.0.0.1 with free ports, a temporary storage folder and a
generated configuration (authentication on, one test user, remote access off), waits until it
answers and stops it afterwards. Tests that need it skip, with the reason, where the binary or
the plugin is missing.

The fixture ``orthanc`` is one server for the whole session, provided by conftest: test modules
must not import it (a module that imports a fixture gets a definition, and so a server, of its
own). Each module that needs an empty PACS clears it (``Orthanc.clear``) in its own fixture.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests

ORTHANC_BIN = Path("/usr/sbin/Orthanc")
DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")
USER, PASSWORD = "pdd-test", "not-a-real-secret"
HOST = "127.0.0.1"
START_TIMEOUT_S = 60.0


@dataclass(frozen=True)
class Orthanc:
    """A running test Orthanc: its REST root, its DICOMweb root and the test user."""

    http_url: str  # http://127.0.0.1:PORT
    user: str
    password: str
    log_file: Path

    @property
    def dicomweb_url(self) -> str:
        """The DICOMweb root, as ``pdd-batch screen`` takes it (``dicomweb+http://...``)."""
        return f"dicomweb+{self.http_url}/dicom-web"

    def session(self) -> requests.Session:
        """A ``requests`` session logged in as the test user."""
        s = requests.Session()
        s.auth = (self.user, self.password)
        return s

    def upload(self, files: list[Path]) -> list[str]:
        """Store DICOM files through Orthanc's REST API; returns the Orthanc instance ids."""
        ids = []
        with self.session() as s:
            for path in files:
                r = s.post(f"{self.http_url}/instances", data=path.read_bytes(), timeout=60)
                r.raise_for_status()
                ids.append(r.json()["ID"])
        return ids

    def clear(self) -> None:
        """Delete every patient (and so every study) stored."""
        with self.session() as s:
            for pid in s.get(f"{self.http_url}/patients", timeout=30).json():
                s.delete(f"{self.http_url}/patients/{pid}", timeout=30).raise_for_status()


def orthanc_missing_reason() -> str | None:
    """Why Orthanc cannot be started here, or ``None`` when it can."""
    if not ORTHANC_BIN.is_file():
        return f"{ORTHANC_BIN} missing (apt-get install orthanc orthanc-dicomweb; see .ci/setup)"
    if not DICOMWEB_PLUGIN.is_file():
        return f"{DICOMWEB_PLUGIN} missing (apt-get install orthanc-dicomweb; see .ci/setup)"
    return None


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def orthanc_config(storage: Path, http_port: int, dicom_port: int) -> dict:
    """The generated configuration: local only, authentication on, DICOMweb on."""
    return {
        "Name": "pdd-batch-test",
        "StorageDirectory": str(storage),
        "IndexDirectory": str(storage),
        "HttpPort": http_port,
        "DicomPort": dicom_port,
        "DicomServerEnabled": False,  # DICOMweb only; no DIMSE listener on the shared machine
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": True,
        "RegisteredUsers": {USER: PASSWORD},
        "Plugins": [str(DICOMWEB_PLUGIN)],
        "DicomWeb": {"Enable": True, "Root": "/dicom-web/", "EnableWado": False, "Host": HOST},
        "OverwriteInstances": True,  # a re-exported SR with the same SOP Instance UID replaces
        "SaveJobs": False,
        "ConcurrentJobs": 1,
        "HttpThreadsCount": 8,
        "StableAge": 1,
        "LuaScripts": [],
        "WebDavEnabled": False,
        "OrthancExplorerEnabled": False,
    }


def _wait_ready(proc: subprocess.Popen, url: str, log_file: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = log_file.read_text(errors="replace")[-2000:]
            raise RuntimeError(f"Orthanc exited with {proc.returncode}:\n{tail}")
        try:
            r = requests.get(f"{url}/system", auth=(USER, PASSWORD), timeout=2)
            if r.ok:
                return
        except requests.ConnectionError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"Orthanc did not answer within {START_TIMEOUT_S:.0f} s")


@contextmanager
def orthanc_process(workdir: Path) -> Iterator[Orthanc]:
    """Start Orthanc in ``workdir`` (config, storage, log), yield it, stop it."""
    storage = workdir / "storage"
    storage.mkdir(parents=True, exist_ok=True)
    http_port, dicom_port = free_port(), free_port()
    config = workdir / "orthanc.json"
    config.write_text(json.dumps(orthanc_config(storage, http_port, dicom_port), indent=1))
    log_file = workdir / "orthanc.log"
    url = f"http://{HOST}:{http_port}"
    with log_file.open("wb") as log:
        proc = subprocess.Popen(
            [str(ORTHANC_BIN), str(config)], stdout=log, stderr=subprocess.STDOUT, cwd=workdir
        )
    try:
        _wait_ready(proc, url, log_file)
        yield Orthanc(url, USER, PASSWORD, log_file)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


@pytest.fixture(scope="session")
def orthanc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Orthanc]:
    """One Orthanc for the test session (tests clear it or use their own studies)."""
    reason = orthanc_missing_reason()
    if reason:
        pytest.skip(reason)
    with orthanc_process(tmp_path_factory.mktemp("orthanc")) as server:
        yield server


def copy_tree(src: Path, dst: Path) -> Path:
    """Copy a folder of test files (tests never write into ../shared)."""
    shutil.copytree(src, dst)
    return dst


class FaultyProxy:
    """An HTTP proxy in front of Orthanc that answers 500 to every request whose path holds
    ``fail_on`` (a series UID), after ``hang_s`` seconds (a server that times out), and forwards
    everything else; counts the failed requests."""

    def __init__(self, target: str, fail_on: str, hang_s: float = 0.0) -> None:
        import http.server
        import threading

        proxy = self
        self.target, self.fail_on, self.failed_requests = target, fail_on, 0
        self.hang_s = hang_s

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server's name
                self._forward("GET")

            def do_POST(self) -> None:  # noqa: N802
                self._forward("POST")

            def _forward(self, method: str) -> None:
                if proxy.fail_on in self.path:
                    proxy.failed_requests += 1
                    time.sleep(proxy.hang_s)
                    self.send_error(500, "injected failure")
                    return
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else None
                keep = ("Accept", "Content-Type", "Authorization")
                headers = {k: v for k, v in self.headers.items() if k in keep}
                r = requests.request(
                    method, proxy.target + self.path, data=body, headers=headers, timeout=60
                )
                self.send_response(r.status_code)
                self.send_header("Content-Type", r.headers.get("Content-Type", "text/plain"))
                self.send_header("Content-Length", str(len(r.content)))
                self.end_headers()
                self.wfile.write(r.content)

            def log_message(self, *args: object) -> None:  # quiet
                return

        self.server = http.server.ThreadingHTTPServer((HOST, 0), Handler)
        self.url = f"http://{HOST}:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> FaultyProxy:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()
